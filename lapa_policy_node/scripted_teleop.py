"""A scripted teleoperator over ROS: drives the simulated arm with the scripted expert through the
same topics a person with a spacemouse (or any teleop) would use, while the recorder records.

It is what ``lapa data collect`` runs: for each (task, seed) it resets the sim (``~/reset``), starts
an episode on the recorder (``~/start``), streams TwistStamped + gripper commands at the control
rate from the expert, which sees only what ROS gives it (/ee_pose, block poses), and stops the
recorder with the sim's success flag. Nothing here touches the simulator in-process.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass

import numpy as np
from geometry_msgs.msg import PoseArray, PoseStamped, TwistStamped
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile
from std_msgs.msg import Bool, Float64, String
from std_srvs.srv import Trigger

from lapa_training.data import bag_format


@dataclass
class CollectedEpisode:
    task: str
    seed: int
    instruction: str
    success: bool
    steps: int
    bag_path: str


class TeleopError(RuntimeError):
    """The sim or the recorder did not answer, or refused a request."""


class ScriptedTeleop(Node):
    """Client of lapa_sim_arm and lapa_recorder; spin it in a background executor."""

    def __init__(self, sim_node: str = "/lapa_sim_arm", recorder_node: str = "/lapa_recorder",
                 twist_topic: str = bag_format.TWIST_TOPIC, gripper_topic: str = bag_format.GRIPPER_TOPIC,
                 ee_pose_topic: str = bag_format.EE_POSE_TOPIC, **kwargs):
        super().__init__("lapa_scripted_teleop", **kwargs)
        from lapa_interfaces.srv import ResetEpisode, StartEpisode, StopEpisode

        self.twist_pub = self.create_publisher(TwistStamped, twist_topic, 10)
        self.gripper_pub = self.create_publisher(Float64, gripper_topic, 10)
        self._lock = threading.Lock()
        self._pose: PoseStamped | None = None
        self._objects: PoseArray | None = None
        self._success = False
        self._episode: dict | None = None
        self.create_subscription(PoseStamped, ee_pose_topic, self._set("_pose"), 10)
        self.create_subscription(PoseArray, f"{sim_node}/object_poses", self._set("_objects"), 10)
        self.create_subscription(Bool, f"{sim_node}/success", lambda m: self._set("_success")(m.data), 10)
        latched = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self.create_subscription(String, f"{sim_node}/episode",
                                 lambda m: self._set("_episode")(json.loads(m.data)), latched)
        self.reset_client = self.create_client(ResetEpisode, f"{sim_node}/reset")
        self.start_client = self.create_client(StartEpisode, f"{recorder_node}/start")
        self.stop_client = self.create_client(StopEpisode, f"{recorder_node}/stop")
        self.discard_client = self.create_client(Trigger, f"{recorder_node}/discard")
        self._types = (ResetEpisode, StartEpisode, StopEpisode)
        self._recorder_name = recorder_node.strip("/").rsplit("/", 1)[-1]
        self.sent: list[tuple[int, np.ndarray, float | None]] = []  # (stamp ns, twist, gripper) this episode

    def _set(self, attr):
        def setter(value):
            with self._lock:
                setattr(self, attr, value)
        return setter

    # ------------------------------------------------------------------ plumbing
    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the sim and recorder services and the sim's state topics are up, and the
        recorder subscribes to the command topics."""
        deadline = time.monotonic() + timeout
        for client in (self.reset_client, self.start_client, self.stop_client, self.discard_client):
            if not client.wait_for_service(timeout_sec=max(0.1, deadline - time.monotonic())):
                raise TeleopError(f"service {client.srv_name} not available after {timeout:.0f} s: "
                                  "is the node running, in the same ROS_DOMAIN_ID?")
        while self._pose is None or self._objects is None:
            if time.monotonic() > deadline:
                raise TeleopError("no /ee_pose or object poses from the simulated arm")
            time.sleep(0.02)
        # commands sent before the recorder's subscriptions match are lost to the bag (volatile topics)
        for pub in (self.twist_pub, self.gripper_pub):
            while not any(info.node_name == self._recorder_name
                          for info in self.get_subscriptions_info_by_topic(pub.topic_name)):
                if time.monotonic() > deadline:
                    raise TeleopError(f"the recorder does not subscribe to {pub.topic_name} after {timeout:.0f} s: "
                                      "does its configuration record the teleop's command topics?")
                time.sleep(0.02)

    def _call(self, client, request, timeout: float = 10.0, resend: bool = False):
        """Call a service and wait for its answer. resend=True (services that accept the same request
        twice): a request unanswered for timeout/2 is sent once more, for the rare DDS request or
        reply lost right after the service was discovered."""
        future = client.call_async(request)
        deadline = time.monotonic() + timeout
        resend_at = time.monotonic() + timeout / 2 if resend else float("inf")
        while not future.done():
            if time.monotonic() > resend_at:
                resend_at = float("inf")
                first, future = future, client.call_async(request)
                client.remove_pending_request(first)
            if time.monotonic() > deadline:
                raise TeleopError(f"{client.srv_name} did not answer within {timeout:.0f} s")
            time.sleep(0.005)
        return future.result()

    def _observation(self, t: float):
        """The expert's observation, built only from what arrived over ROS."""
        from lapa_sim.env import Observation

        with self._lock:
            pose, objects = self._pose, self._objects
        p, q = pose.pose.position, pose.pose.orientation
        blocks = objects.poses
        return Observation(time=t, tcp_pos=np.array([p.x, p.y, p.z]), tcp_quat=np.array([q.w, q.x, q.y, q.z]),
                           gripper_opening=float("nan"), joint_names=(), joint_pos=np.zeros(0),
                           joint_vel=np.zeros(0),
                           block_pos=np.array([[b.position.x, b.position.y, b.position.z] for b in blocks]),
                           block_quat=np.array([[b.orientation.w, b.orientation.x, b.orientation.y,
                                                 b.orientation.z] for b in blocks]),
                           success=self._success)

    def _send(self, twist: np.ndarray, gripper: float | None) -> None:
        msg = TwistStamped()
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.header.frame_id = bag_format.BASE_FRAME
        (msg.twist.linear.x, msg.twist.linear.y, msg.twist.linear.z,
         msg.twist.angular.x, msg.twist.angular.y, msg.twist.angular.z) = (float(v) for v in twist)
        self.twist_pub.publish(msg)
        self.sent.append((_ns(msg.header.stamp), np.array(twist, float), gripper))
        if gripper is not None:
            self.gripper_pub.publish(Float64(data=float(gripper)))

    def stop_arm(self) -> None:
        self._send(np.zeros(6), None)

    # ------------------------------------------------------------------ one episode
    def run_episode(self, task: str, seed: int, *, control_rate: float = 10.0, noise: float = 0.03,
                    instruction_set: str = "train", name: str | None = None,
                    settle_s: float = 0.3) -> CollectedEpisode:
        from lapa_sim import tasks
        from lapa_sim.expert import ScriptedExpert

        ResetEpisode, StartEpisode, StopEpisode = self._types
        self.sent.clear()
        self.stop_arm()
        reset = self._call(self.reset_client, ResetEpisode.Request(task=task, seed=seed,
                                                                   instruction_set=instruction_set))
        if not reset.success:
            raise TeleopError(f"sim refused reset to {task}/{seed}: {reset.message}")
        reset_stamp = self.get_clock().now().nanoseconds
        # wait until state published after the reset has arrived (no stale pre-reset poses)
        deadline = time.monotonic() + 5.0
        while True:
            with self._lock:
                pose, objects, episode = self._pose, self._objects, self._episode
            fresh = (pose is not None and objects is not None and _ns(pose.header.stamp) > reset_stamp
                     and _ns(objects.header.stamp) > reset_stamp)
            if fresh and episode is not None and episode.get("seed") == seed and episode.get("task") == task:
                break
            if time.monotonic() > deadline:
                raise TeleopError("no fresh state from the sim after reset")
            time.sleep(0.01)
        with self._lock:
            self._success = False
        time.sleep(settle_s)  # the first camera frames of the new layout reach the recorder

        start = self._call(self.start_client, StartEpisode.Request(
            instruction=reset.instruction, name=name or f"{task}_{seed:06d}", task=task, seed=seed),
            timeout=20.0, resend=True)
        if not start.success:
            raise TeleopError(f"recorder refused to start: {start.message}")
        expert = ScriptedExpert(tasks.sample_episode(task, seed), noise=noise, seed=seed)
        period = 1.0 / control_rate
        max_steps = int(round(tasks.MAX_SECONDS[task] / period))
        t_start = time.monotonic()
        steps, success = 0, False
        try:
            while steps < max_steps:
                tick = t_start + steps * period
                time.sleep(max(0.0, tick - time.monotonic()))
                obs = self._observation(time.monotonic() - t_start)
                if obs.success:
                    success = True
                    break
                twist, gripper = expert.act(obs)
                self._send(twist, gripper)
                steps += 1
            self.stop_arm()
            time.sleep(settle_s)  # the final state reaches the bag
            with self._lock:
                success = success or self._success
        except BaseException:
            self.stop_arm()
            self._call(self.discard_client, Trigger.Request())
            raise
        stop = self._call(self.stop_client, StopEpisode.Request(task_success=success))
        if not stop.success:
            raise TeleopError(f"recorder could not save the episode: {stop.message}")
        return CollectedEpisode(task, seed, reset.instruction, success, steps, stop.bag_path)


def _ns(stamp) -> int:
    return stamp.sec * 10**9 + stamp.nanosec
