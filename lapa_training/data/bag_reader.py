"""One rosbag2 episode (MCAP or sqlite3) to frames on a fixed control-rate grid plus 7-D actions.

Reads bags that lapa-ros records (bag_format.py) as well as plain ``ros2 bag record`` bags, with the
``rosbags`` library, in a single pass over the topics it needs:

- Time: header stamps (receive time for header-less types such as std_msgs/Float64, and for a
  zero stamp). The grid is t_k = t_0 + k / rate for t_k <= last image stamp, t_0 = first image
  stamp; frame k is the newest image stamped <= t_k + tolerance. Images arriving out of stamp
  order are re-ordered within a window of REORDER_WINDOW messages (later ones are dropped and
  counted). Gaps between images longer than gap_periods control periods are reported.
- Images are deserialized and decoded only when they become a stored frame, each once.
- Actions (actions.py): the first source the bag has, in this order (or the one --actions names):
  commanded twists; an end-effector pose topic; the TF tree between the base and TCP frames
  (tf_tree.py); joint states + the robot's URDF (joint_states.py, kinematics.py). With none of them
  the episode is action-free. Steps with no source data near enough keep NaN actions, and a warning says so.
- Gripper: the gripper command topic, else the goals of a control_msgs/GripperCommand action (its
  send_goal service events, as `ros2 bag record` records an action with introspection on), else a
  finger joint of /joint_states (--gripper-joint). Message types the typestore lacks are registered
  from the definitions stored in the bag.
- A bag is a rosbag2 directory, or a single .mcap/.db3 file as other writers leave it.

    episode = read_bag(Path("bags/pick_place_000003"), BagOptions(rate_hz=10), sink)
    # sink.add_frame(rgb) / sink.repeat_frame() got one call per grid step
"""

from __future__ import annotations

import functools
import heapq
import json
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import numpy as np

from lapa_training.data import actions as act
from lapa_training.data import bag_format, cdr
from lapa_training.data.errors import IncompleteEpisode, IngestError
from lapa_training.data.joint_states import JointStateHistory
from lapa_training.data.kinematics import RobotModel
from lapa_training.data.tf_tree import TransformError, TransformHistory
from lapa_training.data.images import (COMPRESSED_IMAGE_TYPE, IMAGE_TYPE, IMAGE_TYPES, compressed_msg_to_rgb,
                                        jpeg_info, raw_image_to_rgb)

TWIST_TYPES = ("geometry_msgs/msg/TwistStamped", "geometry_msgs/msg/Twist")
POSE_TYPES = ("geometry_msgs/msg/PoseStamped",)
TF_TYPES = ("tf2_msgs/msg/TFMessage",)
JOINT_TYPES = ("sensor_msgs/msg/JointState",)
TF_TOPIC, TF_STATIC_TOPIC = "/tf", "/tf_static"
SEND_GOAL_EVENTS = "/_action/send_goal/_service_event"  # the topic of an action's goal requests, after its name
GRIPPER_GOAL_EVENT = "GripperCommand_SendGoal_Event"  # control_msgs/action/..., the type on that topic
GRIPPER_TYPES = ("std_msgs/msg/Float64", "std_msgs/msg/Float32")
STRING_TYPES = ("std_msgs/msg/String",)
INSTRUCTION_TXT = "instruction.txt"
ACTION_SOURCES = ("auto", "twist", "pose", "tf", "joints", "none")
BAG_FILE_SUFFIXES = (".mcap", ".db3")
CLOCK_MISMATCH_S = 0.5  # header stamps of two topics this far apart (relative to receive time): unsynchronised clocks
REORDER_WINDOW = 16  # images; a camera's stamps are at most this many messages out of arrival order



class FrameSink(Protocol):
    """Where frames go as they are resampled (DatasetWriter implements it); camera names another camera's.
    A sink whose frame_codec is "jpeg" may also take a camera's JPEG as it is: add_jpeg(data, JpegInfo,
    camera) -> False to refuse."""

    def add_frame(self, rgb: np.ndarray, camera: str | None = None) -> None: ...

    def repeat_frame(self, camera: str | None = None) -> None: ...


@dataclass
class BagOptions:
    """How to read a bag. Topics left None use bag_format's defaults when the bag has them."""

    image_topic: str | None = None  # None: the default topic, else the bag's only image topic
    extra_image_topics: tuple[str, ...] = ()  # more cameras, stored at the first one's frame times
    twist_topic: str | None = None
    pose_topic: str | None = None
    gripper_topic: str | None = None
    instruction_topic: str | None = None
    joint_topic: str | None = None
    tf_topic: str = TF_TOPIC
    tf_static_topic: str = TF_STATIC_TOPIC
    actions: str = "auto"  # auto: the first of ACTION_SOURCES[1:-1] the bag has; or force one of them
    urdf: str | None = None  # the robot's URDF, for actions from joint states and a finger joint's limits
    gripper_action: str | None = None  # a control_msgs/GripperCommand action's name (None: the bag's only one)
    gripper_joint: str | None = None  # a finger joint of /joint_states as the gripper, when there is no command topic
    rate_hz: float = 10.0  # control rate of the stored frames and actions
    window_s: float = 0.6  # LAQ window; recorded per episode as round(window_s * rate_hz) frames
    stale_timeout_s: float = 0.25  # a twist older than this counts as zero (MoveIt Servo)
    base_frame: str = bag_format.BASE_FRAME
    tcp_frame: str = bag_format.TCP_FRAME
    gripper_open: float | None = None  # value meaning fully open (None: 1 on the command topic, the joint's upper limit)
    gripper_closed: float | None = None  # ... fully closed (None: 0 on the command topic, the joint's lower limit)
    stamp_tolerance_s: float = 0.001
    gap_periods: float = 3.0  # report image gaps longer than this many control periods
    instructions: Mapping[str, str] | None = None  # bag directory name -> instruction (--instructions)
    allow_empty_instruction: bool = False

    @property
    def window_frames(self) -> int:
        return max(1, int(round(self.window_s * self.rate_hz)))


@dataclass
class BagEpisode:
    """What read_bag found; the frames themselves went to the sink."""

    path: Path
    grid_ns: np.ndarray  # (N,) int64 stamps of the stored frames [ns]
    actions: np.ndarray  # (N, 7) float32, row k = step k -> k+1, last row NaN; all NaN if action-free
    has_actions: bool
    instruction: str
    success: bool | None
    task: str | None
    fps: float
    window_frames: int
    provenance: dict[str, Any]
    warnings: list[str] = field(default_factory=list)

    @property
    def timestamps_s(self) -> np.ndarray:
        """(N,) seconds since the first stored frame."""
        return (self.grid_ns - self.grid_ns[0]) * 1e-9 if len(self.grid_ns) else np.zeros(0)

    def record(self) -> dict[str, Any]:
        """The episodes.jsonl fields (without index/start/length/split, which the writer adds)."""
        return {"name": self.path.name, "instruction": self.instruction, "has_actions": self.has_actions,
                "success": self.success, "task": self.task, "fps": self.fps,
                "window_frames": self.window_frames, "provenance": self.provenance}


# ---------------------------------------------------------------- bag metadata
def episode_metadata(path: Path, custom_data: Mapping[str, str] | None) -> dict[str, Any]:
    """lapa metadata of a bag: metadata.yaml custom_data (``lapa.`` keys), completed by episode.json.

    Values in custom_data are strings; JSON-looking ones (true, 3, 0.5, {...}) are parsed, except
    the instruction, which is always kept as written.
    """
    meta: dict[str, Any] = {}
    for key, value in (custom_data or {}).items():
        if not key.startswith(bag_format.CUSTOM_DATA_PREFIX):
            continue
        name = key[len(bag_format.CUSTOM_DATA_PREFIX):]
        if name == "instruction":
            meta[name] = value
            continue
        try:
            meta[name] = json.loads(value)
        except (TypeError, ValueError):
            meta[name] = value
    side = path / bag_format.EPISODE_JSON
    if side.is_file():
        try:
            data = json.loads(side.read_text())
        except (OSError, ValueError) as e:
            raise IngestError(f"{side}: unreadable episode.json ({e})") from e
        if isinstance(data, dict):
            for key, value in data.items():
                meta.setdefault(key, value)
    return meta


def is_incomplete(path: Path) -> bool:
    """True for an episode bag that is still being recorded or was interrupted (see bag_format)."""
    if bag_format.STAGING_DIR in path.parts:
        return True
    side = path / bag_format.EPISODE_JSON
    if side.is_file():
        try:
            return json.loads(side.read_text()).get("status") == bag_format.STATUS_RECORDING
        except (OSError, ValueError, AttributeError):
            return False
    return False


def _describe_topics(topics: Mapping[str, tuple[str, int]]) -> str:
    return ", ".join(f"{t} ({typ.replace('/msg/', '/')}, {n} msgs)" for t, (typ, n) in sorted(topics.items())) \
        or "no topics"


def _pick_topic(path: Path, topics: Mapping[str, tuple[str, int]], requested: str | None, default: str | None,
                types: tuple[str, ...], role: str, option: str) -> str | None:
    """The topic to read for role: the requested one (must exist), else the default if present."""
    name = requested if requested else default
    if name is None or name not in topics:
        if requested:
            raise IngestError(f"{path}: no topic '{requested}' ({role}); the bag has: {_describe_topics(topics)}")
        return None
    if topics[name][0] not in types:
        raise IngestError(f"{path}: topic '{name}' ({role}) has type {topics[name][0]}, expected "
                          f"{' or '.join(types)}; choose another with {option}")
    return name


def _pick_image_topic(path: Path, topics: Mapping[str, tuple[str, int]], requested: str | None) -> str:
    picked = _pick_topic(path, topics, requested, bag_format.IMAGE_TOPIC, IMAGE_TYPES, "images", "--image-topic")
    if picked:
        return picked
    candidates = sorted(t for t, (typ, _) in topics.items() if typ in IMAGE_TYPES)
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise IngestError(f"{path}: no image topic (sensor_msgs/Image or CompressedImage); the bag has: "
                          f"{_describe_topics(topics)}")
    raise IngestError(f"{path}: several image topics ({', '.join(candidates)}); choose one with --image-topic")


# ---------------------------------------------------------------- helpers
def ros2_type_name(msgtype: str | None) -> str:
    """'pkg/msg/Type' also for the 'pkg/Type' that some MCAP writers put in their schemas."""
    if not msgtype:
        return "?"
    parts = msgtype.split("/")
    return f"{parts[0]}/msg/{parts[1]}" if len(parts) == 2 else msgtype


def bag_topics(reader) -> dict[str, tuple[str, int]]:
    """topic -> (type, message count) of an open bag."""
    return {name: (ros2_type_name(info.msgtype), info.msgcount) for name, info in reader.topics.items()}



def _stamp_ns(stamp) -> int:
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def _header_ns(header, receive_ns: int) -> int:
    return _stamp_ns(header.stamp) or receive_ns


class _StampOrder:
    """One camera's images back in stamp order: each is held until REORDER_WINDOW later images have
    arrived, then passed to accept(stamp, seq, payload) (seq: its arrival number); one stamped before
    an image already passed on is late, counted and dropped."""

    def __init__(self, accept: Callable[[int, int, Any], None]):
        self.accept = accept
        self.heap: list[tuple[int, int, Any]] = []
        self.seq = 0
        self.last_stamp: int | None = None
        self.late = 0

    def push(self, stamp: int, payload: Any) -> None:
        heapq.heappush(self.heap, (stamp, self.seq, payload))
        self.seq += 1
        if len(self.heap) > REORDER_WINDOW:
            self._pass(*heapq.heappop(self.heap))

    def flush(self) -> None:
        while self.heap:
            self._pass(*heapq.heappop(self.heap))

    def _pass(self, stamp: int, seq: int, payload: Any) -> None:
        if self.last_stamp is not None and stamp < self.last_stamp:
            self.late += 1
            return
        self.last_stamp = stamp
        self.accept(stamp, seq, payload)


class _Resampler:
    """Turns image stamps in arrival order into the fixed-rate frame grid.

    push(stamp, payload) images as they come; for each grid time t_k = t_0 + k * period the newest
    image with stamp <= t_k + tol is passed to emit(payload, repeat), where repeat says that it is
    the same image as the previous grid step. finish() flushes and returns the grid (int64 ns).
    """

    def __init__(self, period_ns: int, tol_ns: int, gap_ns: int, emit: Callable[[Any, bool], None],
                 on_step: Callable[[int], None] | None = None):
        self.period_ns, self.tol_ns, self.gap_ns, self.emit, self.on_step = period_ns, tol_ns, gap_ns, emit, on_step
        self.order = _StampOrder(self._take)
        self.t0: int | None = None
        self.k = 0
        self.last_stamp: int | None = None
        self.candidate: Any = None
        self.candidate_seq = -1
        self.emitted_seq = -1
        self.count = 0
        self.gaps: list[tuple[int, int]] = []  # (stamp before the gap, gap length) [ns]

    @property
    def late(self) -> int:
        return self.order.late

    def push(self, stamp: int, payload: Any) -> None:
        self.order.push(stamp, payload)

    def _take(self, stamp: int, seq: int, payload: Any) -> None:
        if self.t0 is None:
            self.t0 = stamp
        elif stamp - self.last_stamp > self.gap_ns:
            self.gaps.append((self.last_stamp, stamp - self.last_stamp))
        while self.t0 + self.k * self.period_ns + self.tol_ns < stamp:
            self._emit()
        self.candidate, self.candidate_seq = payload, seq
        self.last_stamp = stamp
        self.count += 1

    def _emit(self) -> None:
        self.emit(self.candidate, self.candidate_seq == self.emitted_seq)
        self.emitted_seq = self.candidate_seq
        if self.on_step is not None:
            self.on_step(self.t0 + self.k * self.period_ns)
        self.k += 1

    def finish(self) -> np.ndarray:
        self.order.flush()
        if self.t0 is None:
            return np.zeros(0, dtype=np.int64)
        while self.t0 + self.k * self.period_ns <= self.last_stamp:
            self._emit()
        return self.t0 + np.arange(self.k, dtype=np.int64) * self.period_ns


class _FollowerCamera:
    """Another camera's images at the first camera's grid times: for each t_k, its newest image stamped
    <= t_k + tol (before its first image, the first one stands in, and is counted).

    push(stamp, payload) its images as they come, at(t_k) each grid time as the first camera's grid
    reaches it, finish() at the end; emit(payload, repeat) gets one call per grid time, in order.
    """

    def __init__(self, tol_ns: int, emit: Callable[[Any, bool], None]):
        self.tol_ns, self.emit = tol_ns, emit
        self.order = _StampOrder(self._accept)
        self.accepted: deque[tuple[int, int, Any]] = deque()  # in stamp order, from the candidate on
        self.pending: deque[int] = deque()  # grid times not emitted yet
        self.emitted_seq = -1
        self.count = self.before_first = 0

    @property
    def late(self) -> int:
        return self.order.late

    def push(self, stamp: int, payload: Any) -> None:
        self.order.push(stamp, payload)

    def _accept(self, stamp: int, seq: int, payload: Any) -> None:
        self.accepted.append((stamp, seq, payload))
        self.count += 1
        self._drain(final=False)

    def at(self, t_ns: int) -> None:
        self.pending.append(t_ns)
        self._drain(final=False)

    def _drain(self, final: bool) -> None:
        while self.pending and self.accepted:
            limit = self.pending[0] + self.tol_ns
            if not final and self.accepted[-1][0] <= limit:
                return  # a later image may still be the one for this time
            while len(self.accepted) > 1 and self.accepted[1][0] <= limit:
                self.accepted.popleft()
            stamp, seq, payload = self.accepted[0]
            self.before_first += stamp > limit
            self.emit(payload, seq == self.emitted_seq)
            self.emitted_seq = seq
            self.pending.popleft()

    def finish(self) -> None:
        self.order.flush()
        self._drain(final=True)


# ---------------------------------------------------------------- reading
def open_reader(path: Path):
    from rosbags.rosbag2 import Reader

    if path.is_file() and path.suffix in BAG_FILE_SUFFIXES:
        pass  # a single storage file, as writers other than rosbag2 leave it: rosbags reads its own index
    elif not path.is_dir():
        raise IngestError(f"{path}: not a bag directory or .mcap/.db3 file")
    elif not (path / "metadata.yaml").is_file():
        files = [p.name for p in path.iterdir() if p.suffix in (".mcap", ".db3")]
        hint = f" (it has {', '.join(files)}; `ros2 bag reindex {path}` rebuilds the metadata)" if files else ""
        raise IngestError(f"{path}: missing metadata.yaml, not a complete rosbag2 bag{hint}")
    try:
        reader = Reader(path)
        reader.open()
    except Exception as e:  # rosbags raises ReaderError, sqlite3 errors, OSError, ... for damaged files
        raise IngestError(f"{path}: corrupt or unreadable bag ({type(e).__name__}: {e})") from e
    return reader


def _checked_messages(reader, connections, path: Path):
    """reader.messages(connections), with any failure inside the bag reported as an IngestError."""
    try:
        yield from reader.messages(connections)
    except Exception as e:
        raise IngestError(f"{path}: corrupt or truncated bag ({type(e).__name__}: {e})") from e


def storage_name(reader) -> str:
    storages = getattr(reader.storage, "storages", [])
    name = type(storages[0]).__name__ if storages else ""
    return {"McapReader": "mcap", "Sqlite3Reader": "sqlite3"}.get(name, name or "unknown")


def read_bag(path: str | Path, options: BagOptions, sink: FrameSink) -> BagEpisode:
    """Read one bag directory: frames go to sink (one call per grid step), the rest is returned.

    Raises IncompleteEpisode for a bag still being recorded, IngestError for anything else wrong
    with the bag (the message names the bag and the problem). On error some frames may already be
    in the sink: the caller drops them (DatasetWriter.abort_episode).
    """
    path = Path(path)
    if is_incomplete(path):
        raise IncompleteEpisode(f"{path}: incomplete episode (still recording or interrupted); skipped")
    if options.rate_hz <= 0:
        raise IngestError(f"bad control rate {options.rate_hz} Hz")
    reader = open_reader(path)
    try:
        return _read_open_bag(path, reader, options, sink)
    finally:
        try:
            reader.close()
        except Exception:  # closing a damaged bag can fail again; the first error is the one to report
            pass


def _read_open_bag(path: Path, reader, options: BagOptions, sink: FrameSink) -> BagEpisode:
    ts = bag_format.typestore()
    meta = episode_metadata(path, getattr(getattr(reader.storage, "metadata", None), "custom", None))
    if meta.get("status") == bag_format.STATUS_RECORDING:
        raise IncompleteEpisode(f"{path}: incomplete episode (status 'recording'); skipped")
    topics = bag_topics(reader)
    found = find_sources(path, topics, options)
    image_topic = found.image
    if topics[image_topic][1] == 0:
        raise IngestError(f"{path}: image topic '{image_topic}' has no messages")
    robot = load_robot(options.urdf) if options.urdf and ("joints" in found.actions or options.gripper_joint) else None

    # Instruction fallbacks, known before reading, so a missing instruction fails fast
    fallback_instruction, fallback_source = _instruction_without_topic(path, meta, options)
    if not fallback_instruction and found.instruction is None and not options.allow_empty_instruction:
        raise IngestError(f"{path}: empty instruction: no instruction topic, no lapa.instruction in metadata.yaml "
                          f"or episode.json, no {INSTRUCTION_TXT}, not in --instructions")

    roles = {image_topic: "image", found.instruction: "instruction", **{t: "camera" for t in found.cameras}}
    if "twist" in found.actions:
        roles[found.twist] = "twist"
    if "twist" in found.actions or "pose" in found.actions:
        roles[found.pose] = "pose"  # also what rotates twists given in the TCP frame
    if "tf" in found.actions:
        roles.update({found.tf: "tf", found.tf_static: "tf_static"})
    if "joints" in found.actions or (found.gripper == "joint"):
        roles[found.joints] = "joints"
    if found.gripper == "topic" and found.actions:
        roles[found.gripper_topic] = "gripper"
    if found.gripper == "action" and found.actions:
        roles[found.gripper_action] = "gripper_action"
    roles.pop(None, None)
    conns = [c for c in reader.connections if c.topic in roles]
    role_of = {c.id: roles[c.topic] for c in conns}
    type_of = {c.id: ros2_type_name(c.msgtype) for c in conns}
    if "gripper_action" in role_of.values():
        ts = bag_typestore(path, reader, set(type_of.values()))

    # ---- single pass
    period_ns = int(round(1e9 / options.rate_hz))
    tol_ns = int(round(options.stamp_tolerance_s * 1e9))
    seen: dict[str, dict[str, Any]] = {}  # camera topic -> encoding and native size of its first decoded image

    def decode(raw: bytes, topic: str) -> np.ndarray:
        image_type = topics[topic][0]
        try:
            if image_type == IMAGE_TYPE:
                f = cdr.image(raw)
                rgb = raw_image_to_rgb(f.height, f.width, f.encoding, f.is_bigendian, f.step, f.data)
                kind = f.encoding
            else:
                msg = ts.deserialize_cdr(raw, image_type)
                rgb, kind = compressed_msg_to_rgb(msg), f"compressed {msg.format}"
        except IngestError as e:
            raise IngestError(f"{path}: topic {topic}: {e}") from e
        except Exception as e:
            raise IngestError(f"{path}: cannot parse {image_type} on {topic} ({type(e).__name__}: {e})") from e
        if topic not in seen:
            seen[topic] = {"encoding": kind, "native_size": [int(rgb.shape[1]), int(rgb.shape[0])]}
        return rgb

    # a sink of raw frames decodes every JPEG anyway: it is not offered them, nor are they parsed twice
    add_jpeg = getattr(sink, "add_jpeg", None) if getattr(sink, "frame_codec", None) == "jpeg" else None

    def stored_as_recorded(raw: bytes, topic: str, camera: str | None) -> bool:
        """A camera's JPEG handed to a sink that keeps JPEG frames of its size: no decode, no re-encode."""
        try:
            msg = cdr.compressed_image(raw)
        except Exception as e:
            raise IngestError(f"{path}: cannot parse {COMPRESSED_IMAGE_TYPE} on {topic} ({type(e).__name__}: {e})") \
                from e
        info = jpeg_info(msg.data) if "compresseddepth" not in msg.format.lower() else None
        if info is None or not add_jpeg(msg.data, info, camera=camera):
            return False
        if topic not in seen:
            seen[topic] = {"encoding": f"compressed {msg.format}, stored as recorded",
                           "native_size": [info.width, info.height]}
        return True

    def emitter(camera: str | None):
        topic = camera or image_topic
        passthrough = add_jpeg is not None and topics[topic][0] == COMPRESSED_IMAGE_TYPE

        def emit(raw: bytes, repeat: bool) -> None:
            if repeat:
                sink.repeat_frame(camera=camera)
            elif not (passthrough and stored_as_recorded(raw, topic, camera)):
                sink.add_frame(decode(raw, topic), camera=camera)
        return emit

    followers = {t: _FollowerCamera(tol_ns, emitter(t)) for t in found.cameras}
    grid = _Resampler(period_ns, tol_ns, int(round(options.gap_periods * period_ns)), emitter(None),
                      on_step=(lambda t_ns: [f.at(t_ns) for f in followers.values()]) if followers else None)
    twist_ns, twist_frames, twist_vals = [], [], []
    pose_ns, pose_frames, pose_vals = [], [], []
    grip_ns, grip_vals = [], []
    goals_seen: set[tuple[bytes, int]] = set()
    tf = TransformHistory()
    joints = JointStateHistory()
    clock = _ClockOffsets()
    topic_instructions: list[str] = []
    for conn, receive_ns, raw in _checked_messages(reader, conns, path):
        role, msgtype = role_of[conn.id], type_of[conn.id]
        if role == "image":
            try:
                stamp = cdr.header_stamp_ns(raw) or receive_ns
            except Exception as e:
                raise IngestError(f"{path}: cannot parse {msgtype} on {conn.topic} "
                                  f"({type(e).__name__}: {e})") from e
            clock.add(conn.topic, stamp, receive_ns)
            grid.push(stamp, raw)  # decoded (once) only if it becomes a stored frame
            continue
        if role == "camera":
            try:
                stamp = cdr.header_stamp_ns(raw) or receive_ns
            except Exception as e:
                raise IngestError(f"{path}: cannot parse {msgtype} on {conn.topic} ({type(e).__name__}: {e})") from e
            followers[conn.topic].push(stamp, raw)
            continue
        try:
            if role == "twist":
                if msgtype == "geometry_msgs/msg/TwistStamped":
                    stamp, frame_id, values = cdr.twist_stamped(raw)
                else:  # plain Twist: no header, so receive time and the base frame
                    tw = ts.deserialize_cdr(raw, msgtype)
                    stamp, frame_id = 0, ""
                    values = (tw.linear.x, tw.linear.y, tw.linear.z, tw.angular.x, tw.angular.y, tw.angular.z)
                twist_ns.append(stamp or receive_ns)
                twist_frames.append(frame_id)
                twist_vals.append(values)
                if stamp:
                    clock.add(conn.topic, stamp, receive_ns)
            elif role == "gripper":
                grip_ns.append(receive_ns)
                grip_vals.append(cdr.float64(raw) if msgtype == "std_msgs/msg/Float64"
                                 else float(ts.deserialize_cdr(raw, msgtype).data))
            elif role == "gripper_action":
                event = ts.deserialize_cdr(raw, msgtype)
                key = (bytes(event.info.client_gid), int(event.info.sequence_number))
                if event.request and key not in goals_seen:  # client and server may both report a goal
                    goals_seen.add(key)
                    grip_ns.append(_stamp_ns(event.info.stamp) or receive_ns)
                    grip_vals.append(float(event.request[0].goal.command.position))
            elif role == "pose":
                msg = ts.deserialize_cdr(raw, msgtype)
                pose_ns.append(_header_ns(msg.header, receive_ns))
                clock.add(conn.topic, pose_ns[-1], receive_ns)
                pose_frames.append(msg.header.frame_id)
                p, q = msg.pose.position, msg.pose.orientation
                pose_vals.append((p.x, p.y, p.z, q.w, q.x, q.y, q.z))
            elif role in ("tf", "tf_static"):
                transforms = cdr.tf_message(raw)
                if transforms and not all(t[0] for t in transforms):  # a zero stamp: the receive time
                    transforms = [(t[0] or receive_ns, *t[1:]) for t in transforms]
                if role == "tf" and transforms:
                    clock.add(conn.topic, transforms[0][0], receive_ns)
                tf.add_transforms(transforms, static=role == "tf_static")
            elif role == "joints":
                stamp, names, positions = cdr.joint_state(raw)
                clock.add(conn.topic, stamp or receive_ns, receive_ns)
                joints.add(stamp or receive_ns, names, positions)
            elif role == "instruction":
                text = ts.deserialize_cdr(raw, msgtype).data.strip()
                if text:
                    topic_instructions.append(text)
        except Exception as e:  # a message that does not parse: damaged bag or wrong type definition
            raise IngestError(f"{path}: cannot parse {msgtype} on {conn.topic} "
                              f"({type(e).__name__}: {e})") from e
    grid_ns = grid.finish()
    if len(grid_ns) == 0:
        raise IngestError(f"{path}: no readable images on '{image_topic}'")

    warnings: list[str] = []
    for topic, follower in followers.items():
        follower.finish()
        if follower.count == 0:
            raise IngestError(f"{path}: camera {topic} has no images")
        if follower.before_first:
            warnings.append(f"{path}: camera {topic} starts {follower.before_first} frame(s) after {image_topic}; "
                            "its first image stands in for them")
        if follower.late:
            warnings.append(f"{path}: {follower.late} images on {topic} arrived more than {REORDER_WINDOW} messages "
                            "out of stamp order and were dropped")
    if grid.late:
        warnings.append(f"{path}: {grid.late} images arrived more than {REORDER_WINDOW} messages out of stamp "
                        "order and were dropped")
    if grid.gaps:
        longest = max(g for _, g in grid.gaps) * 1e-9
        warnings.append(f"{path}: {len(grid.gaps)} gap(s) between images longer than {options.gap_periods:g} "
                        f"control periods (longest {longest:.2f} s); frames are repeated over them")

    # ---- instruction
    if topic_instructions:
        instruction, instruction_source = topic_instructions[0], f"topic {found.instruction}"
        if len(set(topic_instructions)) > 1:
            warnings.append(f"{path}: {len(set(topic_instructions))} different instructions on {found.instruction}; "
                            "using the first")
    else:
        instruction, instruction_source = fallback_instruction, fallback_source
    if not instruction and not options.allow_empty_instruction:
        raise IngestError(f"{path}: empty instruction (topic {found.instruction} has no text, and there is no "
                          f"lapa.instruction, episode.json, {INSTRUCTION_TXT} or --instructions entry)")

    # ---- actions: the first source that gives them (only one is tried when --actions names it)
    actions = np.full((len(grid_ns), bag_format.ACTION_DIM), np.nan, dtype=np.float64)
    max_outside_ns = int(round(options.stale_timeout_s * 1e9))
    # measured states (TF, joints) are held at most half a period past their ends and interpolated across
    # gaps up to the stale timeout: longer, and the steps have no actions rather than made-up ones
    hold_ns = period_ns // 2
    pose_arr = np.array(pose_vals, dtype=np.float64).reshape(-1, 7)
    pose_ns_arr = np.array(pose_ns, dtype=np.int64)
    failures: list[str] = []
    action_source = None
    for source in found.actions:
        topic = {"twist": found.twist, "pose": found.pose, "tf": found.tf, "joints": found.joints}[source]
        try:
            clock.check(path, image_topic, topic)
            if source == "twist":
                deltas = _twist_deltas(path, found, options, grid_ns, twist_ns, twist_frames, twist_vals,
                                       pose_ns_arr, pose_arr, max_outside_ns)
            elif source == "pose":
                deltas = _pose_deltas(path, found, options, grid_ns, pose_ns_arr, pose_frames, pose_arr,
                                      max_outside_ns)
            elif source == "tf":
                try:
                    deltas = act.transform_deltas(tf.lookup(options.base_frame, options.tcp_frame, grid_ns,
                                                            hold_ns, max_outside_ns))
                except TransformError as e:
                    raise IngestError(f"{path}: no actions from {found.tf}: {e} (set --base-frame / --tcp-frame)") \
                        from e
            else:
                deltas = _joint_deltas(path, found, options, robot, joints, grid_ns, hold_ns, max_outside_ns)
        except IngestError as e:
            if options.actions != "auto" or source in ("twist", "pose"):
                raise  # a twist or pose topic is there on purpose: its problem is the user's to fix
            failures.append(str(e))
            continue
        actions[:-1, :6] = deltas
        action_source = source
        break
    if action_source is None:
        if failures:
            warnings.append(f"{path}: episode is action-free: " + "; ".join(failures))
        elif found.note:
            warnings.append(f"{path}: episode is action-free: {found.note}")
    else:
        missing = int(np.isnan(actions[:-1, :6]).any(axis=1).sum())
        if missing:
            warnings.append(f"{path}: {missing} of {len(grid_ns) - 1} steps have no {action_source} data within "
                            f"{options.stale_timeout_s:g} s (it starts late, ends early or has gaps); they are "
                            "stored without actions")
        actions[:-1, 6], gripper_warning = _gripper(path, found, options, robot, joints, grid_ns,
                                                    grip_ns, grip_vals, hold_ns)
        if gripper_warning:
            warnings.append(gripper_warning)

    provenance = {
        "kind": "bag", "source": str(path.resolve()), "storage": storage_name(reader),
        "topics": {"image": image_topic, "twist": found.twist, "pose": found.pose, "tf": found.tf,
                   "tf_static": found.tf_static, "joints": found.joints,
                   "gripper": found.gripper_action if found.gripper == "action" else found.gripper_topic,
                   "instruction": found.instruction},
        "encoding": seen.get(image_topic, {}).get("encoding"), "native_size": seen.get(image_topic, {}).get("native_size"),
        "cameras": {t: {**seen.get(t, {}), "num_images": f.count, "late_images_dropped": f.late,
                        "frames_before_first_image": f.before_first} for t, f in followers.items()} or None,
        "action_source": action_source, "gripper_source": found.gripper if action_source else None,
        "urdf": str(Path(options.urdf).resolve()) if robot is not None else None,
        "instruction_source": instruction_source,
        "start_time_ns": int(grid_ns[0]), "num_images": grid.count, "late_images_dropped": grid.late,
        "image_gaps": [{"at_s": round((t - int(grid_ns[0])) * 1e-9, 4), "length_s": round(g * 1e-9, 4)}
                       for t, g in grid.gaps[:20]],
        "robot": meta.get("robot"), "seed": meta.get("seed"), "recorded_by": meta.get("source"),
    }
    success = meta.get("success")
    return BagEpisode(path=path, grid_ns=grid_ns, actions=actions.astype(np.float32),
                      has_actions=action_source is not None, instruction=instruction,
                      success=success if isinstance(success, bool) else None,
                      task=meta.get("task") if isinstance(meta.get("task"), str) else None,
                      fps=float(options.rate_hz), window_frames=options.window_frames,
                      provenance=provenance, warnings=warnings)


# ---------------------------------------------------------------- action sources
@dataclass
class FoundSources:
    """The topics of one bag and the action and gripper sources they offer, before any message is read."""

    image: str
    cameras: list[str]  # the other cameras' topics
    twist: str | None
    pose: str | None
    tf: str | None
    tf_static: str | None
    joints: str | None
    gripper_topic: str | None
    instruction: str | None
    actions: list[str]  # the sources to try, in order
    gripper: str | None  # 'topic', 'action', 'joint' or None
    gripper_action: str | None = None  # the send_goal event topic of a GripperCommand action
    note: str = ""  # why there is no action source, when there is none


def find_sources(path: Path, topics: Mapping[str, tuple[str, int]], options: BagOptions) -> FoundSources:
    """Pick topics by option or default and list the action sources the bag has, in the order to try them."""
    if options.actions not in ACTION_SOURCES:
        raise IngestError(f"unknown action source '{options.actions}'; use one of {', '.join(ACTION_SOURCES)}")

    def pick(requested, default, types, role, option):
        return _pick_topic(path, topics, requested, default, types, role, option)

    found = FoundSources(
        image=_pick_image_topic(path, topics, options.image_topic),
        cameras=[_pick_topic(path, topics, t, None, IMAGE_TYPES, "images", "--image-topic")
                 for t in options.extra_image_topics],
        twist=pick(options.twist_topic, bag_format.TWIST_TOPIC, TWIST_TYPES, "twist commands", "--twist-topic"),
        pose=pick(options.pose_topic, bag_format.EE_POSE_TOPIC, POSE_TYPES, "end-effector poses", "--pose-topic"),
        tf=_pick_topic(path, topics, None, options.tf_topic, TF_TYPES, "transforms", "--tf-topic"),
        tf_static=_pick_topic(path, topics, None, options.tf_static_topic, TF_TYPES, "static transforms",
                              "--tf-topic"),
        joints=pick(options.joint_topic, bag_format.JOINT_STATE_TOPIC, JOINT_TYPES, "joint states",
                    "--joint-state-topic"),
        gripper_topic=pick(options.gripper_topic, bag_format.GRIPPER_TOPIC, GRIPPER_TYPES, "gripper commands",
                           "--gripper-topic"),
        instruction=pick(options.instruction_topic, bag_format.INSTRUCTION_TOPIC, STRING_TYPES, "instruction",
                         "--instruction-topic"),
        actions=[], gripper=None)

    def has(topic):
        return topic is not None and topics[topic][1] > 0

    available = {"twist": has(found.twist), "pose": has(found.pose), "tf": has(found.tf),
                 "joints": has(found.joints) and options.urdf is not None}
    if options.actions == "auto":
        found.actions = [s for s in ACTION_SOURCES[1:-1] if available[s]]
        if not found.actions and has(found.joints):
            found.note = f"it has {found.joints} but no --urdf to compute the TCP pose from them"
        elif not found.actions:
            found.note = "no twist, end-effector pose, /tf or joint-state messages"
    elif options.actions != "none":
        wanted = options.actions
        if not available[wanted]:
            why = {"twist": "no twist messages (set --twist-topic)", "pose": "no pose messages (set --pose-topic)",
                   "tf": f"no messages on {options.tf_topic}",
                   "joints": "no joint-state messages (set --joint-state-topic)" if options.urdf
                   else "no --urdf to compute the TCP pose from joint states"}[wanted]
            label = {"twist": "twists", "pose": "poses", "tf": "TF", "joints": "joint states"}[wanted]
            raise IngestError(f"{path}: actions from {label} requested but there are {why}; "
                              f"the bag has: {_describe_topics(topics)}")
        found.actions = [wanted]
    found.gripper_action = _pick_gripper_action(path, topics, options.gripper_action)
    if has(found.gripper_topic):
        found.gripper = "topic"
    elif has(found.gripper_action):
        found.gripper = "action"
    elif options.gripper_joint:
        if not has(found.joints):
            raise IngestError(f"{path}: --gripper-joint {options.gripper_joint} but no joint-state messages "
                              f"(set --joint-state-topic); the bag has: {_describe_topics(topics)}")
        found.gripper = "joint"
    return found


def _pick_gripper_action(path: Path, topics: Mapping[str, tuple[str, int]], requested: str | None) -> str | None:
    """The send_goal event topic of the GripperCommand action named, else of the bag's only one."""
    candidates = sorted(t for t, (typ, _) in topics.items()
                        if t.endswith(SEND_GOAL_EVENTS) and typ.endswith(GRIPPER_GOAL_EVENT))
    if requested:
        topic = requested.rstrip("/") + SEND_GOAL_EVENTS
        if topic not in candidates:
            raise IngestError(f"{path}: no goals of a GripperCommand action '{requested}' (no {topic}); "
                              f"the bag has: {_describe_topics(topics)}")
        return topic
    if len(candidates) > 1:
        raise IngestError(f"{path}: several GripperCommand actions "
                          f"({', '.join(t[:-len(SEND_GOAL_EVENTS)] for t in candidates)}); choose one with --gripper-action")
    return candidates[0] if candidates else None


def bag_typestore(path: Path, reader, types: set[str]):
    """The typestore for the given message types: the shared one, or a copy completed from the definitions
    stored in the bag (control_msgs, users' own messages) when it lacks some."""
    from rosbags.typesys import Stores, get_types_from_idl, get_types_from_msg, get_typestore

    shared = bag_format.typestore()
    missing = {t for t in types if t not in shared.types}
    if not missing:
        return shared
    store = get_typestore(Stores.ROS2_KILTED)
    for conn in reader.connections:
        name = ros2_type_name(conn.msgtype)
        if name not in missing or name in store.types:
            continue
        fmt = getattr(getattr(conn.msgdef, "format", None), "name", "")
        text = getattr(conn.msgdef, "data", "")
        try:
            found = get_types_from_idl(text) if fmt == "IDL" else get_types_from_msg(text, name) if text else {}
            store.register({k: v for k, v in found.items() if k not in store.types})
        except Exception as e:
            raise IngestError(f"{path}: the definition of {name} stored in the bag does not parse ({e})") from e
    still = sorted(t for t in missing if t not in store.types)
    if still:
        raise IngestError(f"{path}: the bag stores no definition of {', '.join(still)} (recorded by an old rosbag2?)")
    return store


def _twist_deltas(path, found, options, grid_ns, twist_ns, twist_frames, twist_vals, pose_ns_arr, pose_arr,
                  max_outside_ns) -> np.ndarray:
    vals = np.array(twist_vals, dtype=np.float64).reshape(-1, 6)
    t_ns = np.array(twist_ns, dtype=np.int64)
    frames = np.array(twist_frames, dtype=object)
    in_tcp = frames == options.tcp_frame
    unknown = sorted(set(frames[~in_tcp]) - {"", options.base_frame})
    if unknown:
        raise IngestError(f"{path}: twists on {found.twist} are in frame '{unknown[0]}'; only the base frame "
                          f"'{options.base_frame}' and the TCP frame '{options.tcp_frame}' are supported "
                          "(set --base-frame / --tcp-frame)")
    if in_tcp.any():
        if not len(pose_arr):
            raise IngestError(f"{path}: twists on {found.twist} are in the TCP frame '{options.tcp_frame}' but "
                              "the bag has no end-effector poses to rotate them into the base frame "
                              "(set --pose-topic)")
        for cols in (slice(0, 3), slice(3, 6)):
            vals[in_tcp, cols] = act.rotate_to_base(vals[in_tcp, cols], t_ns[in_tcp], pose_ns_arr,
                                                    pose_arr[:, 3:], max_outside_ns)
    return act.twist_deltas(grid_ns, t_ns, vals[:, :3], vals[:, 3:], options.stale_timeout_s)


def _pose_deltas(path, found, options, grid_ns, pose_ns_arr, pose_frames, pose_arr, max_outside_ns) -> np.ndarray:
    bad = sorted(set(pose_frames) - {"", options.base_frame})
    if bad:
        raise IngestError(f"{path}: poses on {found.pose} are in frame {bad[0]}, not the base frame "
                          f"'{options.base_frame}' (set --base-frame)")
    return act.pose_deltas(grid_ns, pose_ns_arr, pose_arr[:, :3], pose_arr[:, 3:], max_outside_ns)


def _joint_deltas(path, found, options, robot, joints, grid_ns, hold_ns, max_gap_ns) -> np.ndarray:
    names = robot.chain_joints(options.base_frame, options.tcp_frame)
    try:
        q = joints.positions_at(names, grid_ns, hold_ns, max_gap_ns)
    except KeyError as e:
        raise IngestError(f"{path}: joint '{e.args[0]}' of the chain {options.base_frame} -> {options.tcp_frame} "
                          f"is never in {found.joints} (it has: {', '.join(joints.names) or 'no positions'})") from e
    return act.transform_deltas(robot.transforms(options.base_frame, options.tcp_frame, q))


def _gripper(path, found, options, robot, joints, grid_ns, grip_ns, grip_vals, max_outside_ns):
    """(closure per step (N-1,), warning or None) from the command topic or a finger joint."""
    if found.gripper == "topic":
        open_value = 1.0 if options.gripper_open is None else options.gripper_open
        closed_value = 0.0 if options.gripper_closed is None else options.gripper_closed
        if open_value == closed_value:
            raise IngestError("--gripper-open and --gripper-closed must differ")
        return act.gripper_closure(grid_ns, np.array(grip_ns, dtype=np.int64), np.array(grip_vals),
                                   open_value, closed_value), None
    if found.gripper == "action":
        open_value, closed_value = options.gripper_open, options.gripper_closed
        if (open_value is None or closed_value is None) and options.gripper_joint and robot is not None:
            lower, upper = robot.joint_limits(options.gripper_joint)  # the position the controller commands
            open_value = upper if open_value is None else open_value
            closed_value = lower if closed_value is None else closed_value
        if open_value is None or closed_value is None:
            raise IngestError(f"{path}: GripperCommand goals on {found.gripper_action} need the positions that mean "
                              "open and closed: --gripper-open and --gripper-closed, or --gripper-joint with --urdf")
        if open_value == closed_value:
            raise IngestError("--gripper-open and --gripper-closed must differ")
        return act.gripper_closure(grid_ns, np.array(grip_ns, dtype=np.int64), np.array(grip_vals),
                                   open_value, closed_value), None
    if found.gripper == "joint":
        joint = options.gripper_joint
        open_value, closed_value = options.gripper_open, options.gripper_closed
        if open_value is None or closed_value is None:
            if robot is None:
                raise IngestError(f"{path}: --gripper-joint {joint} needs --urdf for its limits "
                                  "(or --gripper-open and --gripper-closed in joint units)")
            lower, upper = robot.joint_limits(joint)
            open_value = upper if open_value is None else open_value
            closed_value = lower if closed_value is None else closed_value
        if open_value == closed_value:
            raise IngestError("--gripper-open and --gripper-closed must differ")
        try:
            position = joints.positions_at([joint], grid_ns[1:], max_outside_ns)[joint]
        except KeyError as e:
            raise IngestError(f"{path}: gripper joint '{joint}' is never in {found.joints} "
                              f"(it has: {', '.join(joints.names) or 'no positions'})") from e
        # the finger's position at the end of each step stands for the command during it
        return np.clip((open_value - position) / (open_value - closed_value), 0.0, 1.0), None
    return np.full(len(grid_ns) - 1, np.nan), (
        f"{path}: no gripper source (no {found.gripper_topic or bag_format.GRIPPER_TOPIC} messages, no "
        "GripperCommand goals, no --gripper-joint); the gripper action is unknown (NaN) in every step")


class _ClockOffsets:
    """Median header stamp minus receive time per topic, to catch topics stamped by unsynchronised clocks."""

    def __init__(self):
        self._offsets: dict[str, list[int]] = {}

    def add(self, topic: str, stamp_ns: int, receive_ns: int) -> None:
        offsets = self._offsets.setdefault(topic, [])
        if len(offsets) < 1000:
            offsets.append(stamp_ns - receive_ns)

    def check(self, path: Path, image_topic: str, other: str | None) -> None:
        if other is None or not self._offsets.get(other) or not self._offsets.get(image_topic):
            return
        a, b = (float(np.median(self._offsets[t])) * 1e-9 for t in (image_topic, other))
        if abs(a - b) > CLOCK_MISMATCH_S:
            raise IngestError(f"{path}: header stamps on {image_topic} and {other} disagree by {abs(a - b):.2f} s "
                              "relative to the times the bag received them: their clocks are not synchronised")


@functools.lru_cache(maxsize=4)
def load_robot(urdf: str) -> RobotModel:
    """The robot model of a URDF file, parsed once per ingest."""
    return RobotModel.from_urdf(urdf)


def _instruction_without_topic(path: Path, meta: Mapping[str, Any], options: BagOptions) -> tuple[str, str | None]:
    """(instruction, where it came from) from metadata, episode.json, instruction.txt or --instructions."""
    text = meta.get("instruction")
    if isinstance(text, str) and text.strip():
        return text.strip(), "metadata"
    side = path / INSTRUCTION_TXT if path.is_dir() else path.with_suffix(".txt")
    if side.is_file():
        text = side.read_text().strip()
        if text:
            return text, INSTRUCTION_TXT
    if options.instructions:
        for key in (path.name, path.stem, str(path), str(path.resolve())):
            text = options.instructions.get(key)
            if text and text.strip():
                return text.strip(), "instructions file"
    return "", None
