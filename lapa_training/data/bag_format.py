"""The conventions of the episode bags lapa-ros writes, in one place.

One episode = one rosbag2 directory (MCAP by default, sqlite3 optional), readable by `ros2 bag info`.
The recorder node (``lapa_recorder``), the in-process generator (``lapa data generate``) and ingest
all use these names. Ingest also reads bags that ``ros2 bag record`` made; for those the topic names
are options and the instruction comes from a topic, the metadata or a side file.

Episode metadata lives in two places that say the same thing:
- ``custom_data`` of the bag's ``metadata.yaml`` (keys below, prefixed ``lapa.``), which
  ``ros2 bag info`` and every rosbag2 reader keeps;
- ``episode.json`` beside it (plain JSON, same keys without the prefix), for humans and scripts.

Crash safety: an episode is recorded into ``<out>/.recording/<name>/`` and moved to ``<out>/<name>/``
only once its bag is closed. A recorder killed mid-episode leaves earlier episodes untouched and the
interrupted one under ``.recording/`` with ``episode.json`` saying ``"status": "recording"``; ingest
never mistakes it for a finished episode.
"""

from __future__ import annotations

import functools

# Default topics (those of lapa_sim_arm and MoveIt Servo)
IMAGE_TOPIC = "/camera/image_raw"
CAMERA_INFO_TOPIC = "/camera/camera_info"
TWIST_TOPIC = "/servo_node/delta_twist_cmds"
GRIPPER_TOPIC = "/gripper/command"  # std_msgs/Float64, opening 0 closed .. 1 open
JOINT_STATE_TOPIC = "/joint_states"
EE_POSE_TOPIC = "/ee_pose"
INSTRUCTION_TOPIC = "/lapa/instruction"  # std_msgs/String, written once at the start of an episode

MSGTYPES = {
    IMAGE_TOPIC: "sensor_msgs/msg/Image",
    CAMERA_INFO_TOPIC: "sensor_msgs/msg/CameraInfo",
    TWIST_TOPIC: "geometry_msgs/msg/TwistStamped",
    GRIPPER_TOPIC: "std_msgs/msg/Float64",
    JOINT_STATE_TOPIC: "sensor_msgs/msg/JointState",
    EE_POSE_TOPIC: "geometry_msgs/msg/PoseStamped",
    INSTRUCTION_TOPIC: "std_msgs/msg/String",
}

BASE_FRAME = "panda_link0"
TCP_FRAME = "panda_hand_tcp"

# Metadata keys (``custom_data`` has them with the prefix, episode.json without)
CUSTOM_DATA_PREFIX = "lapa."
META_KEYS = ("instruction", "success", "robot", "fps", "task", "seed", "source", "status",
             "started_at", "duration_s", "topics")
EPISODE_JSON = "episode.json"
STAGING_DIR = ".recording"
STATUS_RECORDING = "recording"
STATUS_COMPLETE = "complete"

# The 7-D end-effector delta every dataset action is expressed in: in the robot base frame,
# translation of the TCP over one control step [m], rotation over one step as roll/pitch/yaw of
# R_delta where R_next = R_delta @ R_now [rad], and the commanded gripper closure (0 open .. 1 closed).
ACTION_NAMES = ("dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper")
ACTION_DIM = len(ACTION_NAMES)


@functools.cache
def typestore():
    """The rosbags message definitions (ROS 2 Kilted) every bag writer and reader here uses."""
    from rosbags.typesys import Stores, get_typestore

    return get_typestore(Stores.ROS2_KILTED)
