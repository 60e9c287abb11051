"""``lapa_recorder``: records demonstration episodes, one rosbag2 bag per episode.

Services
    ~/start     lapa_interfaces/srv/StartEpisode  (instruction, optional name/task/seed)
    ~/stop      lapa_interfaces/srv/StopEpisode   (task_success) -> the finished bag
    ~/discard   std_srvs/srv/Trigger              drop the episode being recorded
Publishes
    ~/status    std_msgs/String (JSON, latched): recording or idle, episode, instruction, counts
    /diagnostics  diagnostic_msgs/DiagnosticArray at 1 Hz: per topic rate, age and probable drops

Records the camera image topic(s) (sensor-data QoS), camera info, the commanded end-effector twist
(MoveIt Servo's input) and gripper command, joint states, the EE pose, /tf and /tf_static, and the
instruction (as a std_msgs/String on /lapa/instruction plus the bag metadata). Static transforms
are published once, when their publisher starts: the recorder keeps the latest of each publisher and
writes them at the start of every episode, so each bag holds its whole TF tree. Messages are taken as serialized CDR
straight from DDS and written without a deserialize/serialize round trip. An empty topic parameter
switches that stream off.

Crash safety: each episode is written under <output_dir>/.recording/ and moved next to the others
only when it is closed, so a recorder killed mid-episode never damages earlier episodes and never
leaves a half-written bag that looks finished. On SIGINT/SIGTERM the episode in progress is closed
and kept with success unknown.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

from geometry_msgs.msg import PoseStamped, TwistStamped
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, JointState
from std_msgs.msg import Float64, String
from std_srvs.srv import Trigger

from lapa_core.health import RateMeter, recorder_statuses
from lapa_core.node_params import RECORDER
from lapa_policy_node.diagnostics import DiagnosticsPublisher
from lapa_policy_node.runtime import ConfigError, declare_params, validate_topic
from lapa_training.data import bag_format
from lapa_training.data.episode_writer import EpisodeBagWriter, EpisodeWriterError

# topic parameter -> (message class, bag message type, QoS kind)
STREAMS = {
    "image_topics": (Image, "sensor_msgs/msg/Image", "sensor"),
    "compressed_image_topics": (CompressedImage, "sensor_msgs/msg/CompressedImage", "sensor"),
    "camera_info_topics": (CameraInfo, "sensor_msgs/msg/CameraInfo", "sensor"),
    "twist_topic": (TwistStamped, "geometry_msgs/msg/TwistStamped", "reliable"),
    "gripper_topic": (Float64, "std_msgs/msg/Float64", "reliable"),
    "joint_state_topic": (JointState, "sensor_msgs/msg/JointState", "reliable"),
    "ee_pose_topic": (PoseStamped, "geometry_msgs/msg/PoseStamped", "reliable"),
    "tf_topic": (None, "tf2_msgs/msg/TFMessage", "reliable"),
    "tf_static_topic": (None, "tf2_msgs/msg/TFMessage", "latched"),
}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class RecorderNode(Node):
    def __init__(self, **kwargs):
        super().__init__("lapa_recorder", **kwargs)
        p = declare_params(self, RECORDER)
        self.output_dir = Path(p["output_dir"])
        self.storage = p["storage"]
        self.robot = p["robot"]
        self.max_episode_s = p["max_episode_seconds"]
        self.streams: dict[str, tuple[type, str, str]] = {}  # resolved topic -> (class, bag type, qos)
        for param, (cls, msgtype, qos) in STREAMS.items():
            value = p[param]
            for topic in (value if isinstance(value, list) else [value]):
                if topic:
                    self.streams[validate_topic(self, param, topic)] = (cls or _tf_message(param), msgtype, qos)
        if not self.streams:
            raise ConfigError("every topic parameter is empty: nothing to record")
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"parameter 'output_dir': cannot create {self.output_dir}: {e}") from None

        self.writer: EpisodeBagWriter | None = None
        self._started = 0.0
        self._instruction = ""
        self._latched: dict[str, dict[bytes, bytes]] = {}  # latched topic -> the messages that stay valid
        self._meters = {topic: RateMeter() for topic in self.streams}
        DiagnosticsPublisher(self, lambda: recorder_statuses(
            time.monotonic(), {t: m for t, m in self._meters.items() if t not in self._latched},
            self.writer.name if self.writer is not None else None, node=self.get_name()))
        for topic, (cls, _, qos) in self.streams.items():
            profile = {"sensor": qos_profile_sensor_data, "reliable": 10,
                       "latched": QoSProfile(depth=100, durability=DurabilityPolicy.TRANSIENT_LOCAL)}[qos]
            if qos == "latched":
                self._latched[topic] = {}
            self.create_subscription(cls, topic, lambda data, t=topic: self._on_message(t, data), profile, raw=True)

        from lapa_interfaces.srv import StartEpisode, StopEpisode  # built by setup.sh into the venv

        self.create_service(StartEpisode, "~/start", self._on_start)
        self.create_service(StopEpisode, "~/stop", self._on_stop)
        self.create_service(Trigger, "~/discard", self._on_discard)
        latched = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self.status_pub = self.create_publisher(String, "~/status", latched)
        self.create_timer(1.0, self._check_duration)
        self._publish_status()
        self.get_logger().info(f"recorder ready: {len(self.streams)} topics -> {self.output_dir.resolve()} "
                               f"({self.storage}); call ~/start to record an episode")

    # ------------------------------------------------------------------ episode control
    def _on_start(self, request, response):
        response.success = False
        instruction = request.instruction.strip()
        if self.writer is not None:
            if request.name == self.writer.name and instruction == self._instruction:
                # the same start again: a client re-sending a request whose answer it never got
                response.success, response.bag_path = True, str(self.writer.final_path)
                response.message = f"already recording '{self.writer.name}' (the same episode: start repeated)"
                return response
            response.message = f"already recording '{self.writer.name}'; stop or discard it first"
            return response
        if not instruction:
            response.message = "empty instruction: every episode needs its language instruction"
            return response
        name = request.name or time.strftime("%Y%m%d_%H%M%S_") + (request.task or "episode")
        if not NAME_RE.match(name):
            response.message = f"bad episode name '{name}': use letters, digits, '_', '-' or '.'"
            return response
        metadata = {"instruction": instruction, "robot": self.robot, "source": "lapa_recorder",
                    "task": request.task or None, "seed": int(request.seed) if request.seed >= 0 else None}
        try:
            writer = EpisodeBagWriter(self.output_dir, name, storage=self.storage, metadata=metadata)
            for topic, (_, msgtype, qos) in self.streams.items():
                writer.add_topic(topic, msgtype, qos)
            writer.add_topic(bag_format.INSTRUCTION_TOPIC, "std_msgs/msg/String", "latched")
            now = self.get_clock().now().nanoseconds
            writer.write_msg(bag_format.INSTRUCTION_TOPIC, now,
                             bag_format.typestore().types["std_msgs/msg/String"](data=instruction))
            for topic, messages in self._latched.items():  # e.g. /tf_static, sent long before this episode
                for data in messages.values():
                    writer.write(topic, now, data)
        except (EpisodeWriterError, OSError) as e:
            response.message = str(e)
            return response
        self.writer, self._started, self._instruction = writer, time.monotonic(), instruction
        response.success, response.bag_path = True, str(writer.final_path)
        response.message = f"recording '{name}': {instruction}"
        self.get_logger().info(response.message)
        self._publish_status()
        return response

    def _on_stop(self, request, response):
        if self.writer is None:
            response.success, response.message = False, "not recording"
            return response
        writer = self.writer
        try:
            path = self._finish(bool(request.task_success))
        except (EpisodeWriterError, OSError) as e:
            response.success, response.message = False, f"could not close the bag: {e}"
            return response
        response.success, response.bag_path = True, str(path)
        response.message_count, response.duration_s = writer.message_count, writer.duration_s
        response.message = (f"saved '{writer.name}': {writer.message_count} messages, "
                            f"{writer.duration_s:.1f} s, success={bool(request.task_success)}")
        return response

    def _on_discard(self, _request, response):
        if self.writer is None:
            response.success, response.message = False, "not recording"
            return response
        name = self.writer.name
        self.writer.discard()
        self.writer = None
        response.success, response.message = True, f"discarded '{name}'"
        self.get_logger().info(response.message)
        self._publish_status()
        return response

    def _finish(self, success: bool | None, **extra) -> Path:
        writer, self.writer = self.writer, None
        images = max((writer.counts.get(t, 0) for t, (_, m, _) in self.streams.items() if m.endswith("Image")),
                     default=0)
        fps = images / writer.duration_s if writer.duration_s > 0 else None
        path = writer.close(success, fps=round(fps, 2) if fps else None, **extra)
        self.get_logger().info(f"saved episode {path} ({writer.message_count} messages, "
                               f"{writer.duration_s:.1f} s, success={success})")
        self._publish_status()
        return path

    # ------------------------------------------------------------------ data
    def _on_message(self, topic: str, data: bytes) -> None:
        self._meters[topic].add(time.monotonic())
        latched = self._latched.get(topic)
        if latched is not None:  # the newest message per set of frames: a static publisher re-sending replaces itself
            key = _child_frames(data)
            if latched.get(key) == data:
                return  # a latched message delivered again (e.g. to a new subscription): already written
            latched[key] = data
        if self.writer is not None:
            self.writer.write(topic, self.get_clock().now().nanoseconds, data)

    def _check_duration(self) -> None:
        if self.writer is not None and time.monotonic() - self._started > self.max_episode_s:
            self.get_logger().warn(f"episode '{self.writer.name}' reached max_episode_seconds "
                                   f"({self.max_episode_s:.0f} s): stopping it (kept, success unknown)")
            self._finish(None, stopped_by="max_episode_seconds")
        elif self.writer is not None:
            self._publish_status()

    def _publish_status(self) -> None:
        w = self.writer
        status = {"recording": w is not None, "output_dir": str(self.output_dir)}
        if w is not None:
            # per topic too: a camera that sends nothing shows as 0 here while the rest streams in
            status.update(episode=w.name, instruction=w.metadata["instruction"], messages=w.message_count,
                          topics=dict(w.counts), seconds=round(time.monotonic() - self._started, 1))
        self.status_pub.publish(String(data=json.dumps(status)))

    def before_exit(self) -> None:
        """SIGINT/SIGTERM while recording: keep what was recorded, with success unknown."""
        if self.writer is not None:
            self.get_logger().warn(f"shutting down while recording '{self.writer.name}': saving it "
                                   "(success unknown)")
            self._finish(None, stopped_by="shutdown")


def _tf_message(param: str):
    try:
        from tf2_msgs.msg import TFMessage
    except ImportError:
        raise ConfigError(f"parameter '{param}': tf2_msgs is not installed (./setup.sh builds it into the venv; "
                          "on ROS 2, install ros-<distro>-tf2-msgs), or set it to '' to record no transforms") \
            from None
    return TFMessage


def _child_frames(data: bytes) -> bytes:
    """The child frame ids of a TFMessage's CDR, as a key: a static publisher re-sends the same frames."""
    from lapa_training.data import cdr

    try:
        return "\0".join(sorted(t[2] for t in cdr.tf_message(data))).encode()
    except Exception:  # not parseable: keep it under its own bytes
        return bytes(data)


def main(args=None) -> int:
    from lapa_policy_node.runtime import run_node

    return run_node(RecorderNode, args)


if __name__ == "__main__":
    sys.exit(main())
