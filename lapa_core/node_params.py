"""Every parameter of every lapa node, declared once: name, type (that of its default), default,
range or choices, and a one-line description.

The nodes declare their parameters from here (``lapa_policy_node.runtime.declare_params``); the
motion limits' defaults (``lapa_core.safety.MotionLimits``) are read from here; ``config/*.yaml``,
the launch files' defaults and README's parameter tables are checked against it by
tests/test_node_params.py. ``python -m lapa_core.node_params`` prints README's tables.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Iterator


@dataclass(frozen=True)
class Param:
    name: str
    default: Any  # its type is the parameter's type: bool, int, float, str, list[str] or list[float]
    description: str
    between: tuple[float, float] | None = None  # inclusive range of a number
    choices: tuple[str, ...] = ()  # the values a string may take

    def check(self, value: Any) -> str | None:
        """Why value is not acceptable beyond its type (ROS checks types and ranges), or None."""
        if self.choices and value not in self.choices:
            return f"'{value}' is not one of {', '.join(self.choices)}"
        return None


@dataclass(frozen=True)
class NodeParams:
    node: str  # the node's default name, the top-level key of its config file
    config_file: str  # under config/
    params: tuple[Param, ...]

    def __getitem__(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(f"{self.node} has no parameter {name!r}")

    def __iter__(self) -> Iterator[Param]:
        return iter(self.params)

    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params}


_SPEED = (0.001, 2.0)
_RATE = (1.0, 1000.0)

POLICY_SERVER = NodeParams("lapa_policy_server", "policy_server.yaml", (
    Param("checkpoint", "", "policy checkpoint directory (config.json + weights); required"),
    Param("autostart", True, "configure and activate at start; false = a managed lifecycle node that waits for "
          "configure and activate"),
    Param("image_topic", "/camera/image_raw", "camera topic"),
    Param("image_transport", "raw", "raw (sensor_msgs/Image) or compressed", choices=("raw", "compressed")),
    Param("image_converter", "auto", "camera message to RGB: auto (cv_bridge when importable, else built-in), "
          "cv_bridge, or builtin (OpenCV/numpy)", choices=("auto", "cv_bridge", "builtin")),
    Param("ee_pose_topic", "/ee_pose", "TCP pose in the base frame"),
    Param("success_topic", "", "std_msgs/Bool task success signal; '' = none"),
    Param("twist_topic", "/servo_node/delta_twist_cmds", "MoveIt Servo twist input"),
    Param("twist_frame", "panda_link0", "frame_id of the twists (the base frame)"),
    Param("gripper_topic", "/gripper/command", "gripper command topic, or the GripperCommand action's name in "
          "action mode (e.g. /gripper_controller/gripper_cmd); '' = none"),
    Param("gripper_mode", "opening", "opening (std_msgs/Float64 0 closed..1 open), trajectory (JointTrajectory) or "
          "action (control_msgs/GripperCommand goals, as ros2_control's GripperActionController takes them)",
          choices=("opening", "trajectory", "action")),
    Param("gripper_joints", ["panda_finger_joint1"], "joints of the gripper controller (trajectory mode)"),
    Param("gripper_open_position", 0.04, "joint position when open"),
    Param("gripper_closed_position", 0.0, "joint position when closed"),
    Param("gripper_max_effort", 20.0, "max_effort of GripperCommand goals (N; action mode)", between=(0.0, 1000.0)),
    Param("control_rate", 0.0, "policy steps per second; 0 = the policy's own", between=(0.0, 100.0)),
    Param("chunk_ahead", True, "with a chunked policy (chunk_size > 1): predict the next chunk while one executes, "
          "twists at the control rate; false = predict when the chunk is used up (the arm waits meanwhile)"),
    Param("chunk_refill_steps", 0, "chunk_ahead: start the next prediction when this many planned steps are left; "
          "0 = the measured prediction time in control periods + 1", between=(0, 1000)),
    Param("chunk_blend_decay", 0.0, "chunk_ahead: overlapping predictions of a step are averaged, the i-th newest "
          "after the oldest weighing exp(-decay*i) (ACT's temporal ensembling); < 0 favours newer ones",
          between=(-10.0, 10.0)),
    Param("linear_scale", 1.0, "multiplies the policy's translation deltas", between=(0.0, 10.0)),
    Param("angular_scale", 1.0, "multiplies the policy's rotation deltas", between=(0.0, 10.0)),
    Param("max_linear_speed", 0.15, "TCP speed clamp (m/s)", between=_SPEED),
    Param("max_angular_speed", 0.8, "TCP angular speed clamp (rad/s)", between=_SPEED),
    Param("max_linear_accel", 1.0, "TCP acceleration clamp (m/s^2)", between=(0.01, 20.0)),
    Param("max_angular_accel", 4.0, "angular acceleration clamp (rad/s^2)", between=(0.01, 50.0)),
    Param("workspace_min", [0.25, -0.35, 0.02], "workspace box low corner (m, base frame)"),
    Param("workspace_max", [0.75, 0.35, 0.55], "workspace box high corner (m, base frame)"),
    Param("enforce_workspace", True, "keep the TCP in the box (needs a fresh EE pose; goals abort without)"),
    Param("camera_timeout", 0.25, "stop when no camera frame for this long (s)", between=(0.01, 10.0)),
    Param("pose_timeout", 0.5, "stop when no EE pose for this long (s)", between=(0.01, 10.0)),
    Param("servo_command_timeout", 0.25, "how long the servo executes the last twist when none follows (MoveIt "
          "Servo's incoming_command_timeout, s); the workspace box is kept for that long", between=(0.01, 5.0)),
    Param("default_max_steps", 300, "steps per goal unless the goal says", between=(1, 1_000_000)),
    Param("default_timeout_s", 120.0, "seconds per goal unless it says", between=(0.1, 86400.0)),
    Param("servo_node", "/servo_node", "MoveIt Servo node to switch to twist mode and unpause before a goal, "
          "whose halts end it; '' = do not touch Servo"),
))

SIM_ARM = NodeParams("lapa_sim_arm", "sim_arm.yaml", (
    Param("task", "reach", "task to start with: reach, push or pick_place"),
    Param("seed", 0, "layout seed of the first episode", between=(0, 2**31 - 1)),
    Param("twist_topic", "/servo_node/delta_twist_cmds", "TwistStamped input (MoveIt Servo's delta_twist_cmds)"),
    Param("gripper_topic", "/gripper/command", "std_msgs/Float64 gripper opening, 0 closed .. 1 open"),
    Param("image_topic", "/camera/image_raw", "rgb8 camera images"),
    Param("camera_info_topic", "/camera/camera_info", "CameraInfo"),
    Param("ee_pose_topic", "/ee_pose", "TCP pose in the base frame"),
    Param("base_frame", "panda_link0", "planning frame of twists and poses"),
    Param("camera_frame", "front_camera_optical_frame", "image frame_id"),
    Param("image_width", 128, "camera image width (px)", between=(16, 640)),
    Param("image_height", 128, "camera image height (px)", between=(16, 480)),
    Param("camera_rate", 10.0, "camera frames per second (Hz)", between=_RATE),
    Param("state_rate", 50.0, "joint state / EE pose rate (Hz)", between=_RATE),
    Param("physics_rate", 100.0, "how often physics catches up with wall time (Hz)", between=_RATE),
    Param("command_timeout", 0.25, "halt when no twist for this long (s)", between=(0.01, 10.0)),
    Param("max_linear_speed", 0.25, "TCP speed limit (m/s)", between=(0.0, 1.0)),
    Param("max_angular_speed", 1.2, "TCP angular speed limit (rad/s)", between=(0.0, 3.0)),
    Param("servo_node", "/servo_node", "the MoveIt Servo node this arm stands in for: its switch_command_type and "
          "pause_servo services and status topic live under this name"),
    Param("servo_handshake", False, "act as MoveIt Servo: drop twists until switched to TWIST and unpaused, and "
          "twists stamped longer ago than incoming_command_timeout"),
    Param("incoming_command_timeout", 0.1, "with servo_handshake: the oldest header stamp a twist may have (s)",
          between=(0.01, 10.0)),
    Param("publish_tf", False, "publish the links on /tf and /tf_static at state_rate, as robot_state_publisher "
          "does (leave off when it runs)"),
))

RECORDER = NodeParams("lapa_recorder", "recorder.yaml", (
    Param("output_dir", "data/bags", "directory that receives one bag per episode"),
    Param("storage", "mcap", "rosbag2 storage: mcap or sqlite3", choices=("mcap", "sqlite3")),
    Param("robot", "panda", "robot name stored in each episode's metadata"),
    Param("max_episode_seconds", 600.0, "an episode longer than this is stopped and kept (success unknown)",
          between=(1.0, 86400.0)),
    Param("image_topics", ["/camera/image_raw"], "raw camera images; empty = not recorded"),
    Param("compressed_image_topics", [""], "compressed camera images; empty = not recorded"),
    Param("camera_info_topics", ["/camera/camera_info"], "camera intrinsics; empty = not recorded"),
    Param("twist_topic", "/servo_node/delta_twist_cmds",
          "commanded end-effector twist (MoveIt Servo input); empty = not recorded"),
    Param("gripper_topic", "/gripper/command", "gripper command (opening 0 closed .. 1 open); empty = not recorded"),
    Param("joint_state_topic", "/joint_states", "joint states; empty = not recorded"),
    Param("ee_pose_topic", "/ee_pose", "end-effector pose in the base frame; empty = not recorded"),
    Param("tf_topic", "/tf", "transforms (tf2_msgs/TFMessage); empty = not recorded"),
    Param("tf_static_topic", "/tf_static",
          "static transforms, written at the start of every episode; empty = not recorded"),
))

NODES = {spec.node: spec for spec in (POLICY_SERVER, SIM_ARM, RECORDER)}


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_cell(v) for v in value) + "]"
    if value == "":
        return "''"
    return str(value)


def markdown_tables() -> str:
    """README's parameter tables, one per node."""
    out = []
    for spec in NODES.values():
        out += [f"### `{spec.node}` (`config/{spec.config_file}`)", "",
                "| parameter | default | range | description |", "| --- | --- | --- | --- |"]
        for p in spec:
            limits = f"{_cell(p.between[0])} … {_cell(p.between[1])}" if p.between else " / ".join(p.choices)
            out.append(f"| `{p.name}` | `{_cell(p.default)}` | {limits} | {p.description} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    sys.stdout.write(markdown_tables())
