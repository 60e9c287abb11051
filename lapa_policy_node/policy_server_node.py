"""``lapa_policy_server``: camera + language goal in, MoveIt Servo end-effector twists out, safely.

Action server
    ~/follow_instruction   lapa_interfaces/action/FollowInstruction
        goal: instruction (+ max_steps, timeout_s, speed limits; 0 = server default)
        feedback every step: step, predicted 7-D delta, tokens, policy latency
        result: success (+ whether a success signal exists), steps, why it stopped
Topics
    in   <image_topic>          sensor_msgs/Image (any common encoding) or CompressedImage, sensor QoS
    in   <ee_pose_topic>        geometry_msgs/PoseStamped, for the workspace box
    in   <success_topic>        std_msgs/Bool, optional task-success signal ("" = none)
    in   ~/instruction          std_msgs/String: start following this instruction ("" = stop)
    out  <twist_topic>          geometry_msgs/TwistStamped for MoveIt Servo
    out  <gripper_topic>        std_msgs/Float64 opening (0 closed .. 1 open) or a JointTrajectory
    out  ~/status               std_msgs/String (JSON, latched): idle/running, goal, last stop reason
    out  /diagnostics           diagnostic_msgs/DiagnosticArray at 1 Hz
Lifecycle (rclpy.lifecycle; with autostart, the default, it configures and activates itself)
    configure: parameters, checkpoint, topics; activate: goals accepted; deactivate: the goal ends
    with a zero twist, goals rejected; cleanup: the model freed

The arm is stopped (a zero twist is published at once) when a goal is cancelled or preempted, when
the camera stalls (watchdog, independent of the policy thread), when the policy raises or outputs
NaN/inf, when the EE pose is needed and stale, when a goal ends for any reason, and on shutdown.

Threads: every ROS callback (sensors, watchdog, goal/cancel requests) runs on one single-threaded
executor and only swaps state under a lock; each goal's control loop (policy inference included)
runs on a thread of its own, so callbacks keep being served while the policy thinks (rclpy's
MultiThreadedExecutor starved them: docs/lab-notes/ros-check.md).

Timing, one step per act(): a step starts when a frame the policy has not seen arrives, so a command
follows its frame by the policy's own time, not by a timer's phase against the camera. The control
rate is a ceiling kept by a token bucket (steps at least half a period apart, on average no more
than one per period, so a late or early frame from a camera at the control rate is taken at once).
When no new frame comes for 1.5 periods (a camera slower than the control rate, a late frame), the
loop steps on the newest frame again. A goal's first step waits up to one period for a frame newer
than the goal.

Timing, chunked policies (chunk_size > 1, with chunk_ahead): the loop ticks at the control rate and
sends the planned step of each tick; predictions run on a thread of their own ahead of the plan
and overlapping ones are blended (lapa_core.action_chunks), so twists keep the control rate while
the model takes several periods. When the plan runs dry the arm decelerates within its limits.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import dataclass, replace

import numpy as np
from geometry_msgs.msg import PoseStamped, TwistStamped
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.qos import DurabilityPolicy, QoSProfile, qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Bool, Float64, String

from lapa_core.action_chunks import ChunkedController, chunk_time_budget, is_chunked
from lapa_core.controller import Controller
from lapa_core.node_params import POLICY_SERVER
from lapa_core.health import OK, STALE, LatencyMeter, RateMeter, Status, policy_server_statuses
from lapa_core.policy import PolicyLoadError, checkpoint_identity, load_policy
from lapa_policy_node.diagnostics import DiagnosticsPublisher
from lapa_core.safety import MotionLimits, UnsafeCommand
from lapa_policy_node.runtime import ConfigError, declare_params, read_params, validate_topic
from lapa_training.data.images import compressed_msg_to_rgb, image_msg_to_rgb


@dataclass
class _Run:
    """One goal being executed."""

    instruction: str
    goal_id: bytes
    max_steps: int
    deadline: float
    controller: Controller  # this goal's policy step and motion limits
    chunked: ChunkedController | None = None  # predictions ahead of the arm (a chunked policy)
    stop_reason: str | None = None  # set by cancel/preempt/watchdog: the loop ends with it
    cancelled: bool = False
    commanding: bool = False  # past the start-up grace: the watchdog guards the camera from here on


REQUEST_QUEUE_DEPTH = 1000  # goal, cancel and result requests held while the executor is busy


class BadCameraImage(ValueError):
    """A camera message that does not convert to RGB."""


class PolicyServerNode(LifecycleNode):
    """A managed (lifecycle) node. configure: read and check the parameters, load the checkpoint, make
    the subscriptions, publishers and action server; activate: accept goals; deactivate: end the goal
    with a zero twist and reject new ones; cleanup: free the model. With autostart (the default) it
    configures and activates itself at start, as a plain node."""

    def __init__(self, **kwargs):
        super().__init__("lapa_policy_server", **kwargs)
        declare_params(self, POLICY_SERVER)
        self._lock = threading.Lock()  # guards _run, the latest inputs and every command publish
        self._policy_lock = threading.Lock()  # one policy call at a time (a prediction may outlive its goal)
        self._wake = threading.Condition(self._lock)  # a new frame, or a stop: the control loop looks again
        self._run: _Run | None = None
        self._image = None
        self._image_time = -np.inf
        self._image_count = 0
        self._camera = RateMeter()
        self._latency = LatencyMeter()
        self._pose: np.ndarray | None = None
        self._pose_time = -np.inf
        self._success: bool | None = None
        self._success_time = -np.inf
        self._last_reason = ""
        self._cancel_requests: set[bytes] = set()  # goals asked to cancel, even before their loop began
        # goals run one after another: each waits for the goal accepted before it to end
        self._goal_order: dict[bytes, tuple[threading.Event | None, threading.Event]] = {}
        self._last_goal_done: threading.Event | None = None
        self._newest_goal = b""
        self.policy = None
        self.control_rate, self.period = 0.0, float("inf")
        self._active = False
        self._lifecycle = "unconfigured"
        self._configure_error = ""
        self._entities: list = []  # what configure made, destroyed by cleanup
        self._action_server = self._topic_goal = self._servo = self.twist_pub = self.gripper_pub = None
        latched = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self.status_pub = self.create_publisher(String, "~/status", latched)
        DiagnosticsPublisher(self, self._health)
        if self.get_parameter("autostart").value:
            if self.trigger_configure() != TransitionCallbackReturn.SUCCESS:
                raise ConfigError(self._configure_error)
            self.trigger_activate()
        else:
            self._publish_status("unconfigured")
            self.get_logger().info("policy server (managed): waiting for the configure transition")

    # ------------------------------------------------------------------ lifecycle
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self._setup()
        except ConfigError as e:
            self._configure_error = str(e)
            self.get_logger().error(f"configure failed: {e}")
            self._teardown()
            return TransitionCallbackReturn.FAILURE
        self._lifecycle = "inactive"
        self._publish_status("inactive")
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._active, self._lifecycle = True, "active"
        self._publish_status("idle")
        p = self.p
        self.get_logger().info(
            f"policy server ready: {p['checkpoint']} at {self.control_rate:.1f} Hz; camera {p['image_topic']}, "
            f"twists to {p['twist_topic']} ({p['twist_frame']})" +
            (f"; chunks of {self.policy.chunk_size} steps predicted ahead" if self._chunk_ahead else ""))
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._active, self._lifecycle = False, "inactive"
        with self._lock:
            run = self._run
        if run is not None:
            self._stop(run, "server deactivated")
        self._publish_status("inactive")
        self.get_logger().info("deactivated: goals are rejected until activate")
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._teardown()
        self._lifecycle = "unconfigured"
        self._publish_status("unconfigured")
        self.get_logger().info("cleaned up: the model is freed")
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.before_exit()
        self._teardown()
        return TransitionCallbackReturn.SUCCESS

    def _setup(self) -> None:
        """configure: the parameters as they are now, the checkpoint, and every subscription, publisher,
        timer and server; ConfigError names what is wrong."""
        p = self._read_parameters()
        self.p = p
        self._convert = make_converter(p["image_converter"], self.get_logger().info)
        try:
            self.policy = load_policy(p["checkpoint"])
        except PolicyLoadError as e:
            raise ConfigError(f"parameter 'checkpoint': {e}") from None
        self.control_rate = p["control_rate"] or float(getattr(self.policy, "control_rate", 10.0))
        self.period = 1.0 / self.control_rate
        self._chunk_ahead = p["chunk_ahead"] and is_chunked(self.policy)
        # how long a prediction may take before the arm waits for it (lapa_core.action_chunks)
        self._latency_budget = self.period * (chunk_time_budget(self.policy.chunk_size) if self._chunk_ahead else 1)
        self._checkpoint_id = checkpoint_identity(p["checkpoint"])
        keep = self._entities.append

        image_cls = CompressedImage if p["image_transport"] == "compressed" else Image
        keep(self.create_subscription(image_cls, p["image_topic"], self._on_image, qos_profile_sensor_data))
        keep(self.create_subscription(PoseStamped, p["ee_pose_topic"], self._on_pose, 10))
        if p["success_topic"]:
            keep(self.create_subscription(Bool, p["success_topic"], self._on_success, 10))
        keep(self.create_subscription(String, "~/instruction", self._on_instruction_topic, 10))
        self.twist_pub = self.create_publisher(TwistStamped, p["twist_topic"], 10)
        keep(self.twist_pub)
        self.gripper_pub = self._make_gripper_publisher()

        from lapa_interfaces.action import FollowInstruction  # built by setup.sh into the venv

        self.Action = FollowInstruction
        # a burst of requests must not overflow rclpy's default queues (10): every client hears back
        requests = QoSProfile(depth=REQUEST_QUEUE_DEPTH)
        self._action_server = ActionServer(
            self, FollowInstruction, "~/follow_instruction", execute_callback=self._execute,
            goal_callback=self._on_goal, cancel_callback=self._on_cancel,
            handle_accepted_callback=self._on_accepted, goal_service_qos_profile=requests,
            cancel_service_qos_profile=requests, result_service_qos_profile=requests)
        keep(self.create_timer(self.period / 2, self._watchdog))
        # the plain-topic interface sends goals to our own action server; made here, not in the
        # callback: an ActionClient built while the executor spins can be seen half-made
        from rclpy.action import ActionClient

        self._topic_goal = ActionClient(self, FollowInstruction, "~/follow_instruction")
        self.get_logger().info(motion_interface_note())
        if p["servo_node"]:
            from lapa_policy_node.servo_client import ServoModeSwitcher

            self._servo = ServoModeSwitcher(self, p["servo_node"], on_halt=self._on_servo_halt)

    def _teardown(self) -> None:
        """cleanup: destroy what configure made, and let the model go."""
        for entity in self._entities:
            if hasattr(entity, "timer_period_ns"):
                self.destroy_timer(entity)
            elif hasattr(entity, "publish"):
                self.destroy_publisher(entity)
            else:
                self.destroy_subscription(entity)
        self._entities = []
        for server in (self._action_server, self._topic_goal):
            if server is not None:
                server.destroy()
        if self._servo is not None:
            self._servo.destroy()
        if self.gripper_pub is not None:  # through the node, which also drops its event handlers
            if hasattr(self.gripper_pub, "send_goal_async"):
                self.gripper_pub.destroy()  # an action client (gripper_mode action)
            else:
                self.destroy_publisher(self.gripper_pub)
        self._action_server = self._topic_goal = self._servo = self.twist_pub = self.gripper_pub = None
        self.policy = None
        import gc

        gc.collect()

    # ------------------------------------------------------------------ parameters
    def _read_parameters(self) -> dict:
        p = read_params(self, POLICY_SERVER)
        if not p["checkpoint"]:
            raise ConfigError("parameter 'checkpoint' is empty: give the policy checkpoint directory")
        for key in ("image_topic", "ee_pose_topic", "twist_topic", "success_topic", "gripper_topic"):
            if p[key]:
                validate_topic(self, key, p[key])
        try:
            self.limits = MotionLimits.from_params(p)
        except ValueError as e:
            raise ConfigError(f"parameters 'workspace_min'/'workspace_max': {e}") from None
        return p

    def _make_gripper_publisher(self):
        if not self.p["gripper_topic"]:
            return None
        if self.p["gripper_mode"] == "action":
            try:
                from control_msgs.action import GripperCommand
            except ImportError:
                raise ConfigError("parameter 'gripper_mode': control_msgs is not installed (./setup.sh builds its "
                                  "GripperCommand into the venv)") from None
            from rclpy.action import ActionClient

            self._gripper_goal_type, self._gripper_sent = GripperCommand.Goal, None
            return ActionClient(self, GripperCommand, self.p["gripper_topic"])
        if self.p["gripper_mode"] == "trajectory":
            from trajectory_msgs.msg import JointTrajectory

            return self.create_publisher(JointTrajectory, self.p["gripper_topic"], 10)
        return self.create_publisher(Float64, self.p["gripper_topic"], 10)  # (plain publishers: destroy_node frees them)

    # ------------------------------------------------------------------ inputs
    def _on_image(self, msg) -> None:
        with self._lock:
            self._image, self._image_time = msg, time.monotonic()
            self._image_count += 1
            self._camera.add(self._image_time)
            first = self._image_count == 1
            self._wake.notify_all()
        if first:
            size = f"{msg.width}x{msg.height} {msg.encoding}" if isinstance(msg, Image) else msg.format
            self.get_logger().info(f"first camera frame on {self.p['image_topic']} ({size})")

    def _on_pose(self, msg: PoseStamped) -> None:
        p = msg.pose.position
        with self._lock:
            first = self._pose is None
            self._pose, self._pose_time = np.array([p.x, p.y, p.z]), time.monotonic()
        if first:
            self.get_logger().info(f"first EE pose on {self.p['ee_pose_topic']} (frame '{msg.header.frame_id}')")

    def _health(self) -> list:
        if self.policy is None:
            return [Status(f"{self.get_name()}: lifecycle", STALE, f"{self._lifecycle}: no checkpoint loaded" +
                           (f" ({self._configure_error})" if self._configure_error else ""))]
        with self._lock:
            run = self._run
            goal = f"running '{run.instruction}'" if run is not None else \
                "idle" + (f"; last goal: {self._last_reason}" if self._last_reason else "")
            return policy_server_statuses(
                time.monotonic(), camera=self._camera, camera_timeout=self.p["camera_timeout"],
                latency=self._latency, period=self.period, budget=self._latency_budget, goal=goal,
                checkpoint=self._checkpoint_id,
                servo=None if self._servo is None else (self._servo.last_status or (0, "no status received")),
                node=self.get_name()) + [Status(f"{self.get_name()}: lifecycle", OK, self._lifecycle)]

    def _on_servo_halt(self, reason: str) -> None:
        with self._lock:
            run = self._run
        if run is not None and run.stop_reason is None:
            self.get_logger().warn(f"{reason}: ending the goal")
            self._stop(run, reason)

    def _on_success(self, msg: Bool) -> None:
        with self._lock:
            self._success, self._success_time = bool(msg.data), time.monotonic()

    def _on_instruction_topic(self, msg: String) -> None:
        """Plain-topic interface: an instruction starts a goal (preempting), '' stops."""
        text = msg.data.strip()
        if not text:
            with self._lock:
                run = self._run
            if run is not None:
                self._stop(run, "stopped by an empty instruction on ~/instruction")
            return
        self._topic_goal.send_goal_async(self.Action.Goal(instruction=text))

    # ------------------------------------------------------------------ commands
    def _publish_twist(self, twist: np.ndarray) -> None:
        msg = TwistStamped()
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.header.frame_id = self.p["twist_frame"]
        (msg.twist.linear.x, msg.twist.linear.y, msg.twist.linear.z,
         msg.twist.angular.x, msg.twist.angular.y, msg.twist.angular.z) = (float(v) for v in twist)
        self.twist_pub.publish(msg)

    def _publish_gripper(self, closure: float) -> None:
        if self.gripper_pub is None:
            return
        if self.p["gripper_mode"] == "opening":
            self.gripper_pub.publish(Float64(data=1.0 - closure))
            return
        q = self.p["gripper_open_position"] + closure * (self.p["gripper_closed_position"] -
                                                         self.p["gripper_open_position"])
        if self.p["gripper_mode"] == "action":
            self._send_gripper_goal(q)
            return
        from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

        traj = JointTrajectory()
        traj.header.stamp = self.get_clock().now().to_msg()
        traj.joint_names = list(self.p["gripper_joints"])
        point = JointTrajectoryPoint(positions=[q] * len(traj.joint_names))
        point.time_from_start.nanosec = int(self.period * 1e9)
        traj.points = [point]
        self.gripper_pub.publish(traj)

    def _send_gripper_goal(self, position: float) -> None:
        """A GripperCommand goal when the position changes (by 2 % of the range), not every step: the
        controller preempts its goal with each new one."""
        span = abs(self.p["gripper_open_position"] - self.p["gripper_closed_position"]) or 1.0
        if self._gripper_sent is not None and abs(position - self._gripper_sent) < 0.02 * span:
            return
        if not self.gripper_pub.server_is_ready():
            self.get_logger().warn(f"gripper action {self.p['gripper_topic']} is not available: gripper command "
                                   "not sent", throttle_duration_sec=5.0)
            return
        goal = self._gripper_goal_type()
        goal.command.position, goal.command.max_effort = float(position), float(self.p["gripper_max_effort"])
        self.gripper_pub.send_goal_async(goal)
        self._gripper_sent = position

    def _stop(self, run: _Run, reason: str) -> None:
        """Zero twist now; the goal's loop ends with `reason` at its next check."""
        with self._lock:
            if run.stop_reason is None:
                run.stop_reason = reason
            self._publish_twist(np.zeros(6))
            run.controller.arm_stopped()
            self._wake.notify_all()

    # ------------------------------------------------------------------ action server
    def _on_goal(self, goal) -> GoalResponse:
        if not self._active:
            self._last_reason = f"rejected a goal: the server is {self._lifecycle} (activate it first)"
            self.get_logger().warn(self._last_reason)
            return GoalResponse.REJECT
        if not goal.instruction.strip():
            self._last_reason = "rejected a goal with an empty instruction"
            self.get_logger().warn(self._last_reason)
            self._publish_status("idle")
            return GoalResponse.REJECT
        for name in ("timeout_s", "max_linear_speed", "max_angular_speed"):
            value = getattr(goal, name)
            if not np.isfinite(value) or value < 0:
                self._last_reason = f"rejected a goal with {name} = {value}"
                self.get_logger().warn(self._last_reason)
                return GoalResponse.REJECT
        return GoalResponse.ACCEPT

    def _on_accepted(self, goal_handle) -> None:
        goal_id = bytes(goal_handle.goal_id.uuid)
        with self._lock:
            previous = self._run
            done = threading.Event()
            self._goal_order[goal_id] = (self._last_goal_done, done)
            self._last_goal_done, self._newest_goal = done, goal_id
        if previous is not None:  # stopped now; its loop ends at its next check, on its own thread
            self._stop(previous, "preempted by a new goal")
        goal_handle.execute()

    def _on_cancel(self, goal_handle) -> CancelResponse:
        goal_id = bytes(goal_handle.goal_id.uuid)
        with self._lock:
            self._cancel_requests.add(goal_id)
            run = self._run if self._run is not None and self._run.goal_id == goal_id else None
        if run is not None:
            run.cancelled = True
            self._stop(run, "canceled")
        return CancelResponse.ACCEPT

    async def _execute(self, goal_handle):
        """The action server's execute callback, a task on the executor: the goal runs on a thread of
        its own (_run_goal); this task only waits for it, a few ms at a time, so that the executor
        goes on serving every other callback meanwhile."""
        with self._lock:
            before, done = self._goal_order.pop(bytes(goal_handle.goal_id.uuid))
        outcome = {}

        def run() -> None:
            try:
                if before is not None:  # the goal before this one was stopped: let its loop end first
                    before.wait(timeout=5.0)
                outcome["result"] = self._run_goal(goal_handle)
            finally:
                with self._lock:  # also for a goal superseded or failed before its loop began
                    self._cancel_requests.discard(bytes(goal_handle.goal_id.uuid))
                done.set()

        thread = threading.Thread(target=run, name="lapa-goal", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(timeout=0.005)
            await _NextSpin()
        return outcome.get("result") or self.Action.Result(success=False, message="internal error: no result")

    def _run_goal(self, goal_handle):
        goal = goal_handle.request
        with self._lock:
            superseded = self._newest_goal != bytes(goal_handle.goal_id.uuid)
        if superseded:  # a newer goal came while this one waited for its turn: it never moves the arm
            goal_handle.abort()
            self.get_logger().info(f"goal '{goal.instruction.strip()}' preempted before it started")
            return self.Action.Result(success=False, steps=0, message="preempted by a new goal")
        limits = replace(self.limits)
        if goal.max_linear_speed > 0:
            limits.max_linear_speed = min(limits.max_linear_speed, goal.max_linear_speed)
        if goal.max_angular_speed > 0:
            limits.max_angular_speed = min(limits.max_angular_speed, goal.max_angular_speed)
        run = _Run(instruction=goal.instruction.strip(), goal_id=bytes(goal_handle.goal_id.uuid),
                   max_steps=int(goal.max_steps) or self.p["default_max_steps"],
                   deadline=time.monotonic() + (goal.timeout_s or self.p["default_timeout_s"]),
                   controller=Controller(self.policy, limits, self.control_rate,
                                         linear_scale=self.p["linear_scale"],
                                         angular_scale=self.p["angular_scale"]))
        if self._chunk_ahead:
            run.chunked = ChunkedController(run.controller, self.p["chunk_refill_steps"],
                                            self.p["chunk_blend_decay"], self._policy_lock)
        with self._lock:
            self._run = run
            self._success = None if self.p["success_topic"] else self._success
            if run.goal_id in self._cancel_requests:  # cancelled before its loop began
                run.cancelled, run.stop_reason = True, "canceled"
        self.get_logger().info(f"goal: '{run.instruction}' (max {run.max_steps} steps)")
        self._publish_status("running", run)
        if self._servo is not None:  # on this goal's thread: the executor serves everything else meanwhile
            ready, note = self._servo.ensure_twist_mode()
            if not ready:
                self._stop(run, note)
            else:
                self.get_logger().info(note, throttle_duration_sec=60.0)
        try:
            success, steps, reason = self._control_loop(goal_handle, run)
        except Exception as e:  # never leave the arm moving, whatever happened
            success, steps, reason = False, 0, f"internal error: {e!r}"
        finally:
            self._stop(run, "goal ended")
            with self._lock:
                if self._run is run:
                    self._run = None
        if run.cancelled:  # the goal turns CANCELING only after _on_cancel returned: wait for it
            deadline = time.monotonic() + 1.0
            while not goal_handle.is_cancel_requested and time.monotonic() < deadline:
                time.sleep(0.005)
        result = self.Action.Result(success=bool(success), success_known=bool(self.p["success_topic"]),
                                    steps=steps, message=reason)
        if run.cancelled and goal_handle.is_cancel_requested:
            goal_handle.canceled()
        elif success:
            goal_handle.succeed()
        else:
            goal_handle.abort()
        self._last_reason = reason
        self.get_logger().info(f"goal '{run.instruction}' ended after {steps} steps: {reason}")
        self._publish_status("idle")
        return result

    def _control_loop(self, goal_handle, run: _Run) -> tuple[bool, int, str]:
        if run.chunked is not None:
            run.chunked.reset(run.instruction)  # waits for a prediction the goal before left running
        else:
            run.controller.reset(run.instruction)
        # a goal sent right after start-up may beat the first frame or pose: give them a moment
        grace = time.monotonic() + max(1.0, self.p["camera_timeout"])
        while time.monotonic() < grace and run.stop_reason is None:
            with self._lock:
                now = time.monotonic()
                if now - self._image_time <= self.p["camera_timeout"] and (
                        not self.p["enforce_workspace"] or now - self._pose_time <= self.p["pose_timeout"]):
                    break
            time.sleep(0.01)
        run.commanding = True
        if run.chunked is not None:
            return self._chunk_steps(goal_handle, run)
        return self._frame_steps(goal_handle, run)

    def _end_reason(self, run: _Run, steps: int, now: float, success: bool, image, image_age: float, pose,
                    pose_age: float) -> tuple[bool, str] | None:
        """(success, why) when the goal must end before this step, else None."""
        if run.stop_reason is not None:
            return False, run.stop_reason
        if success:
            return True, "success"
        if steps >= run.max_steps:
            return False, f"max_steps ({run.max_steps}) reached"
        if now > run.deadline:
            return False, "timeout"
        if image is None or image_age > self.p["camera_timeout"]:
            return False, f"camera stale: no image for more than {self.p['camera_timeout']:.2f} s on " \
                          f"{self.p['image_topic']}"
        if self.p["enforce_workspace"] and (pose is None or pose_age > self.p["pose_timeout"]):
            return False, f"EE pose stale on {self.p['ee_pose_topic']} (needed for the workspace box)"
        return None

    def _inputs(self, first_frame_time: float) -> tuple:
        """Holding the lock: now, success, image, its age, frame count, pose, its age. Success must be news:
        not a stale "true" about the scene before the goal's first step's frame."""
        now = time.monotonic()
        success = bool(self._success) and self._success_time >= first_frame_time
        return (now, success, self._image, now - self._image_time, self._image_count, self._pose,
                now - self._pose_time)

    def _send(self, goal_handle, run: _Run, proposal, steps: int) -> bool:
        """Limit the proposal with the freshest pose and send it (False: the run stopped meanwhile)."""
        with self._lock:
            if run.stop_reason is not None:  # cancelled/preempted/stale while the policy thought
                return False
            # the freshest pose: the arm moved on while the policy ran
            pose, pose_age = self._pose, time.monotonic() - self._pose_time
            command = run.controller.limit(proposal, pose if self.p["enforce_workspace"] else None, pose_age)
            self._publish_twist(command.twist)
            self._publish_gripper(command.closure)
        out = command.step
        goal_handle.publish_feedback(self.Action.Feedback(
            step=steps, delta=[float(v) for v in out.delta], tokens=[int(t) for t in out.tokens],
            token_kind=out.token_kind, policy_latency_s=float(command.act_seconds)))
        return True

    def _frame_steps(self, goal_handle, run: _Run) -> tuple[bool, int, str]:
        """One act() per step, each on the newest frame (module doc: Timing, one step per act())."""
        steps = 0
        pace = _StepPacer(self.period, time.monotonic())
        with self._lock:  # the first step waits (up to a period) for a frame newer than the goal
            latest, last_frame = time.monotonic() + self.period, self._image_count
        while True:
            with self._lock:
                self._wait_for_step(run, pace, latest, last_frame)
                if steps == 0:
                    first_frame_time = self._image_time
                now, success, image, image_age, last_frame, pose, pose_age = self._inputs(first_frame_time)
            pace.spend(now)
            latest = now + 1.5 * self.period
            end = self._end_reason(run, steps, now, success, image, image_age, pose, pose_age)
            if end is not None:
                return end[0], steps, end[1]
            try:
                rgb = self._convert(image)
            except (ValueError, TypeError) as e:  # cv_bridge's CvBridgeError is a TypeError
                return False, steps, f"bad camera image: {e}"
            try:
                started = time.monotonic()
                with self._policy_lock:
                    proposal = run.controller.propose(rgb, run.instruction)
                self._latency.add(time.monotonic() - started)
            except UnsafeCommand as e:
                return False, steps, f"unsafe policy output: {e}"
            except Exception as e:
                self.get_logger().error(f"policy raised: {e!r}")
                return False, steps, f"policy error: {e!r}"
            if self._send(goal_handle, run, proposal, steps + 1):
                steps += 1

    def _chunk_steps(self, goal_handle, run: _Run) -> tuple[bool, int, str]:
        """A tick per control period, predictions ahead of the arm (module doc: Timing, chunked policies)."""
        chunked, steps, moving = run.chunked, 0, False
        tick = time.monotonic()
        with self._lock:  # the first prediction waits (up to a period) for a frame newer than the goal
            goal_frame, first_frame_due = self._image_count, tick + self.period
        while True:
            with self._lock:
                while run.stop_reason is None and time.monotonic() < tick:
                    self._wake.wait(timeout=tick - time.monotonic())
                if steps == 0:
                    first_frame_time = self._image_time
                now, success, image, image_age, frame, pose, pose_age = self._inputs(first_frame_time)
            end = self._end_reason(run, steps, now, success, image, image_age, pose, pose_age)
            if end is not None:
                return end[0], steps, end[1]
            fresh = frame != goal_frame or now >= first_frame_due
            measured = len(chunked.latencies)
            try:
                proposal = chunked.tick((lambda msg=image: self._converted(msg)) if fresh else None)
            except BadCameraImage as e:
                return False, steps, f"bad camera image: {e}"
            except UnsafeCommand as e:
                return False, steps, f"unsafe policy output: {e}"
            except Exception as e:
                self.get_logger().error(f"policy raised: {e!r}")
                return False, steps, f"policy error: {e!r}"
            for seconds in chunked.latencies[measured:]:
                self._latency.add(seconds)
            if proposal is not None:
                if self._send(goal_handle, run, proposal, steps + 1):
                    steps, moving = steps + 1, True
            elif moving:  # the plan ran dry: slow down within the limits, twists still at the control rate
                self._decelerate(run)
                self.get_logger().warn("the policy's next chunk is late: decelerating until it comes",
                                       throttle_duration_sec=5.0)
            tick += self.period
            if time.monotonic() - tick > self.period:  # far behind (a stalled thread): no burst to catch up
                tick = time.monotonic()

    def _converted(self, msg) -> np.ndarray:
        try:
            return self._convert(msg)
        except (ValueError, TypeError) as e:  # cv_bridge's CvBridgeError is a TypeError
            raise BadCameraImage(str(e)) from None

    def _decelerate(self, run: _Run) -> None:
        with self._lock:
            if run.stop_reason is not None:
                return
            pose, pose_age = self._pose, time.monotonic() - self._pose_time
            twist = run.controller.limiter(np.zeros(6), pose if self.p["enforce_workspace"] else None, pose_age)
            self._publish_twist(twist)

    def _wait_for_step(self, run: _Run, pace: _StepPacer, latest: float, last_frame: int) -> None:
        """Holding the lock: return when the next step is due (see the module doc) or the run stops."""
        while run.stop_reason is None:
            now = time.monotonic()
            if now >= latest:
                return
            if self._image_count != last_frame:
                wait = pace.wait(now)
                if wait <= 0:
                    return
                self._wake.wait(timeout=min(wait, latest - now))
            else:
                self._wake.wait(timeout=latest - now)

    # ------------------------------------------------------------------ watchdog, status, shutdown
    def _watchdog(self) -> None:
        """Camera stalls stop the arm even while the policy thread is busy."""
        with self._lock:
            run, age = self._run, time.monotonic() - self._image_time
        if run is not None and run.commanding and run.stop_reason is None and age > self.p["camera_timeout"]:
            self.get_logger().warn(f"camera stale ({age:.2f} s): stopping the arm")
            self._stop(run, f"camera stale: no image for more than {self.p['camera_timeout']:.2f} s "
                            f"on {self.p['image_topic']}")

    def _publish_status(self, state: str, run: _Run | None = None) -> None:
        status = {"state": state, "lifecycle": self._lifecycle, "last_stop_reason": self._last_reason,
                  "control_rate": self.control_rate}
        if run is not None:
            status["instruction"] = run.instruction
        self.status_pub.publish(String(data=json.dumps(status)))

    def before_exit(self) -> None:
        with self._lock:
            run = self._run
        if run is not None:
            self._stop(run, "node shutting down")
        if self.twist_pub is None:  # not configured: it never commanded the arm
            return
        for _ in range(3):  # a final zero twist, sent more than once in case one is lost
            self._publish_twist(np.zeros(6))
            time.sleep(0.01)
        self.get_logger().info("sent a final zero twist")


class _NextSpin:
    """Awaited in an executor task: hand control back to the executor until its next spin."""

    def __await__(self):
        yield


class _StepPacer:
    """The control rate as a ceiling: steps at least half a period apart, and over any stretch of
    time at most one per period plus two (a token bucket that holds 1.5 steps and may be drawn
    half a step into debt), so a jittery camera at the control rate gets every frame taken at once
    and a faster camera is followed at the control rate."""

    def __init__(self, period: float, now: float, burst: float = 1.5, debt: float = 0.5):
        self.period, self.burst, self.debt = period, burst, debt
        self.tokens, self.time, self.last = 1.0, now, -np.inf

    def wait(self, now: float) -> float:
        """Seconds until a step is allowed (<= 0: now)."""
        tokens = min(self.burst, self.tokens + (now - self.time) / self.period)
        return max((1.0 - self.debt - tokens) * self.period, self.last + 0.5 * self.period - now)

    def spend(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + (now - self.time) / self.period) - 1.0
        self.time = self.last = now


def _to_rgb(msg) -> np.ndarray:
    return compressed_msg_to_rgb(msg) if isinstance(msg, CompressedImage) else image_msg_to_rgb(msg)


def motion_interface_note() -> str:
    """The start-up line on how commands reach the arm: Servo twists always; MoveIt's plan-and-execute
    (moveit_py) is not a mode of this server, whether or not moveit_py is installed."""
    import importlib.util

    try:
        have_moveit_py = importlib.util.find_spec("moveit") is not None
    except (ImportError, ValueError):
        have_moveit_py = False
    if have_moveit_py:
        return ("moveit_py is installed, but this server only streams end-effector twists to MoveIt Servo: "
                "plan-and-execute mode is not offered")
    return "moveit_py is not importable: plan-and-execute mode skipped; streaming end-effector twists to MoveIt Servo"


def make_converter(choice: str, log=print):
    """Camera message -> RGB uint8 (H, W, 3): ROS 2 cv_bridge where it is importable (a real ROS
    install) and chosen ("auto" or "cv_bridge"), else the built-in OpenCV/numpy conversion."""
    if choice != "builtin":
        try:
            from cv_bridge import CvBridge
        except ImportError:
            if choice == "cv_bridge":
                raise ConfigError("parameter 'image_converter': cv_bridge is not importable here "
                                  "(install ros-<distro>-cv-bridge, or use auto/builtin)") from None
        else:
            bridge = CvBridge()
            log("converting camera images with cv_bridge")

            def convert(msg) -> np.ndarray:
                if isinstance(msg, CompressedImage):
                    return np.asarray(bridge.compressed_imgmsg_to_cv2(msg, "rgb8"))
                return np.asarray(bridge.imgmsg_to_cv2(msg, "rgb8"))

            return convert
        log("cv_bridge is not importable: converting camera images with OpenCV/numpy")
    return _to_rgb


def main(args=None) -> int:
    from lapa_policy_node.runtime import run_node

    return run_node(PolicyServerNode, args)


if __name__ == "__main__":
    sys.exit(main())
