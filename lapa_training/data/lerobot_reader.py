"""Episodes from a LeRobot v3.0 dataset folder (lerobot_format.py), for `lapa data ingest`:

    lapa data ingest ~/lerobot/droid_subset --out runs/data/droid --image-topic observation.images.front \\
        --action-key observation.state --action-convention pose_rpy

- Frames: the camera feature named by --image-topic (default: the dataset's only camera), decoded
  with PyAV from its mp4 files (AV1, H.264, ...), or PNG/JPEG bytes for image features. Several
  --image-topic store several cameras, the first in frames/ (as for bags).
  A camera faster than --rate is subsampled by a whole stride (30 fps at 10 Hz: every 3rd frame).
- Instructions: each episode's task (meta/tasks.parquet).
- Actions: the float feature named by --action-key, read by --action-convention:
    delta_rpy       per-frame end-effector deltas [dx dy dz droll dpitch dyaw (gripper)], as lapa's own;
                    a stride > 1 composes them
    pose_rpy        end-effector poses [x y z roll pitch yaw (gripper)] ('sxyz'), deltas taken between frames
    pose_quat_xyzw  end-effector poses [x y z qx qy qz qw (gripper)]
    pose_quat_wxyz  end-effector poses [x y z qw qx qy qz (gripper)]
  The gripper column, when there is one, maps to closure through --gripper-open/--gripper-closed
  (default: it already is closure, 0 open .. 1 closed). Without --action-key the episodes are
  action-free (fine for latent pretraining), and ingest says so once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from lapa_training.data import bag_format
from lapa_training.data import lerobot_format as fmt
from lapa_training.data.actions import matrix_to_rpy, quat_to_matrix, transform_deltas
from lapa_training.data.errors import IngestError

CONVENTIONS = ("delta_rpy", "pose_rpy", "pose_quat_xyzw", "pose_quat_wxyz")
POSE_WIDTH = {"delta_rpy": 6, "pose_rpy": 6, "pose_quat_xyzw": 7, "pose_quat_wxyz": 7}


@dataclass
class LeRobotOptions:
    camera: str | None = None  # feature key; None: the only camera
    extra_cameras: tuple[str, ...] = ()  # more camera features, stored as the dataset's other cameras
    action_key: str | None = None
    action_convention: str = "delta_rpy"
    gripper_open: float | None = None  # the gripper column's value when open / closed (None: it is closure)
    gripper_closed: float | None = None
    rate_hz: float = 10.0  # frames are subsampled by a whole stride towards this rate
    window_s: float = 0.6  # LAQ window of robot data
    allow_empty_instruction: bool = False


def read_lerobot(root: Path, options: LeRobotOptions, writer, warn: Callable[[str], None]) -> list[dict[str, Any]]:
    """Every episode of the dataset at root into writer (DatasetWriter); returns their records."""
    import pyarrow.parquet as pq

    info = fmt.read_info(root)
    fps = float(info["fps"])
    key = _camera(root, info, options.camera)
    feature = info["features"][key]
    extra = [_camera(root, info, name) for name in options.extra_cameras]
    if options.action_key is None:
        warn(f"{root}: no --action-key given: its episodes are ingested action-free (fine for latent pretraining)")
    else:
        _check_action_feature(root, info, options)
    stride = max(1, int(round(fps / options.rate_hz)))
    stored_fps = fps / stride
    window_frames = max(1, int(round(options.window_s * stored_fps)))
    tasks = fmt.read_tasks(root)
    episodes = fmt.read_episodes(root)
    columns = ["episode_index", "frame_index", "task_index"] + ([options.action_key] if options.action_key else []) \
        + [k for k in (key, *extra) if info["features"][k]["dtype"] == "image"]
    tables: dict[Path, dict[int, dict[str, Any]]] = {}  # data file -> episode -> its columns
    videos = {k: _VideoReader(root, k) for k in (key, *extra) if info["features"][k]["dtype"] == "video"}
    records = []
    try:
        for ep in episodes:
            data_file = root / info.get("data_path", fmt.DATA_PATH).format(
                chunk_index=int(ep.get("data/chunk_index", 0)), file_index=int(ep.get("data/file_index", 0)))
            if data_file not in tables:
                tables.clear()  # one data file in memory at a time (episodes are in file order)
                tables[data_file] = _by_episode(pq, data_file, columns)
            rows = tables[data_file].get(int(ep["episode_index"]))
            if rows is None:
                raise IngestError(f"{data_file}: no rows of episode {ep['episode_index']}")
            n = len(rows["frame_index"])
            keep = np.arange(0, n, stride)
            instruction = tasks.get(int(rows["task_index"][0]), "") if n else ""
            if not instruction and not options.allow_empty_instruction:
                raise IngestError(f"{root}: episode {ep['episode_index']} has no task (instruction)")
            writer.begin_episode()
            for k in (key, *extra):
                camera = None if k == key else k  # the first camera is the dataset's frames
                if k in videos:
                    for rgb in videos[k].frames(ep, info, keep, fps):
                        writer.add_frame(rgb, camera=camera)
                else:
                    for i in keep:
                        writer.add_frame(_decode_image(rows[k][i], root, ep["episode_index"]), camera=camera)
            actions = np.full((len(keep), bag_format.ACTION_DIM), np.nan, dtype=np.float32)
            if options.action_key:
                actions = _actions(np.asarray(rows[options.action_key], dtype=np.float64), keep, stride, options)
            record = {"name": f"{root.name}/episode_{int(ep['episode_index']):06d}", "instruction": instruction,
                      "has_actions": options.action_key is not None, "success": None, "task": None,
                      "fps": stored_fps, "window_frames": window_frames,
                      "provenance": {"kind": "lerobot", "source": str(root.resolve()),
                                     "codebase_version": info["codebase_version"], "robot_type": info.get("robot_type"),
                                     "episode_index": int(ep["episode_index"]), "camera": key,
                                     "cameras": [key, *extra] if extra else None, "native_fps": fps,
                                     "stride": stride, "num_source_frames": n,
                                     "action_source": options.action_key and
                                     f"{options.action_key} ({options.action_convention})"}}
            records.append(writer.end_episode(actions, keep / fps, record))
    finally:
        for reader in videos.values():
            reader.close()
    return records


def _camera(root: Path, info: dict[str, Any], wanted: str | None) -> str:
    cameras = fmt.camera_keys(info)
    if wanted is not None:
        if wanted not in cameras:
            raise IngestError(f"{root}: no camera feature {wanted!r} (cameras: {', '.join(cameras) or 'none'})")
        return wanted
    if len(cameras) != 1:
        raise IngestError(f"{root}: {len(cameras)} cameras ({', '.join(cameras) or 'none'}); name one with "
                          f"--image-topic")
    return cameras[0]


def _check_action_feature(root: Path, info: dict[str, Any], options: LeRobotOptions) -> None:
    feature = info["features"].get(options.action_key)
    floats = [k for k, f in info["features"].items() if isinstance(f, dict) and str(f.get("dtype", "")).startswith("float")
              and len(f.get("shape") or []) == 1]
    if feature is None:
        raise IngestError(f"{root}: no feature {options.action_key!r} for --action-key (vector features: "
                          f"{', '.join(floats) or 'none'})")
    if options.action_convention not in CONVENTIONS:
        raise IngestError(f"unknown --action-convention {options.action_convention!r}; use one of {', '.join(CONVENTIONS)}")
    width = int((feature.get("shape") or [0])[0])
    need = POSE_WIDTH[options.action_convention]
    if width < need:
        raise IngestError(f"{root}: {options.action_key} has {width} values; {options.action_convention} needs at "
                          f"least {need} (+ 1 for the gripper)")


def _by_episode(pq, path: Path, columns: list[str]) -> dict[int, dict[str, Any]]:
    try:
        table = pq.read_table(path, columns=columns)
    except (OSError, ValueError, KeyError) as e:
        raise IngestError(f"{path}: cannot read the columns {columns} ({e})") from None
    order = np.lexsort((np.asarray(table.column("frame_index")), np.asarray(table.column("episode_index"))))
    episode = np.asarray(table.column("episode_index"))[order]
    out: dict[int, dict[str, Any]] = {}
    bounds = np.flatnonzero(np.diff(episode)) + 1
    for part in np.split(np.arange(len(order)), bounds):
        if not len(part):
            continue
        rows = order[part]
        cols = {}
        for name in columns:
            column = table.column(name).take(rows)
            cols[name] = column.to_pylist() if name not in ("episode_index", "frame_index", "task_index") \
                else np.asarray(column)
        out[int(episode[part[0]])] = cols
    return out


def _decode_image(cell: Any, root: Path, episode: int) -> np.ndarray:
    import cv2

    data = cell.get("bytes") if isinstance(cell, dict) else cell
    image = cv2.imdecode(np.frombuffer(data or b"", np.uint8), cv2.IMREAD_COLOR) if data else None
    if image is None:
        raise IngestError(f"{root}: an image of episode {episode} cannot be decoded")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


class _VideoReader:
    """Frames of one camera's mp4 files, decoded in order; a file stays open while its episodes follow."""

    def __init__(self, root: Path, key: str):
        self.root, self.key = root, key
        self.path: Path | None = None
        self.container = None
        self.decoded = iter(())
        self.last_time = -np.inf

    def _open(self, path: Path) -> None:
        import av

        self.close()
        try:
            self.container = av.open(str(path))
            stream = self.container.streams.video[0]
        except (av.error.FFmpegError, IndexError, OSError) as e:
            raise IngestError(f"{path}: unreadable video ({e})") from None
        stream.thread_type = "AUTO"
        self.path, self.decoded, self.last_time = path, self.container.decode(stream), -np.inf

    def frames(self, ep: dict[str, Any], info: dict[str, Any], keep: np.ndarray, fps: float):
        """The episode's frames at rows `keep` (RGB uint8), from from_timestamp + row / fps."""
        import av

        prefix = f"videos/{self.key}/"
        path = self.root / info.get("video_path", fmt.VIDEO_PATH).format(
            video_key=self.key, chunk_index=int(ep.get(prefix + "chunk_index", 0)),
            file_index=int(ep.get(prefix + "file_index", 0)))
        start = float(ep.get(prefix + "from_timestamp") or 0.0)
        targets = start + keep / fps
        if path != self.path or targets[0] < self.last_time:  # another file, or a step back: decode afresh
            self._open(path)
        tolerance = 0.5 / fps
        for target in targets:
            while True:
                try:
                    frame = next(self.decoded)
                except StopIteration:
                    raise IngestError(f"{path}: the video ends before {target:.3f} s (episode "
                                      f"{ep['episode_index']})") from None
                except av.error.FFmpegError as e:
                    raise IngestError(f"{path}: unreadable video ({e})") from None
                t = float(frame.time)
                self.last_time = t
                if t >= target - tolerance:
                    break
            if t > target + tolerance:
                raise IngestError(f"{path}: no frame at {target:.3f} s (episode {ep['episode_index']}; next at {t:.3f} s)")
            yield frame.to_ndarray(format="rgb24")

    def close(self) -> None:
        if self.container is not None:
            self.container.close()
            self.container = None
            self.path = None


def _closure(values: np.ndarray, options: LeRobotOptions) -> np.ndarray:
    if options.gripper_open is not None and options.gripper_closed is not None \
            and options.gripper_open != options.gripper_closed:
        values = (values - options.gripper_open) / (options.gripper_closed - options.gripper_open)
    return np.clip(values, 0.0, 1.0)


def _euler_matrices(rpy: np.ndarray) -> np.ndarray:
    """(n, 3) roll pitch yaw ('sxyz': R = Rz(yaw) Ry(pitch) Rx(roll)) -> (n, 3, 3)."""
    r, p, y = (rpy[:, i] for i in range(3))
    cr, sr, cp, sp, cy, sy = np.cos(r), np.sin(r), np.cos(p), np.sin(p), np.cos(y), np.sin(y)
    return np.stack([np.stack([cy * cp, cy * sp * sr - sy * cr, cy * sp * cr + sy * sr], 1),
                     np.stack([sy * cp, sy * sp * sr + cy * cr, sy * sp * cr - cy * sr], 1),
                     np.stack([-sp, cp * sr, cp * cr], 1)], 1)


def _actions(values: np.ndarray, keep: np.ndarray, stride: int, options: LeRobotOptions) -> np.ndarray:
    """lapa's 7-D deltas for the kept rows: row j is the step from kept frame j to kept frame j + 1."""
    convention = options.action_convention
    width = POSE_WIDTH[convention]
    values = values.reshape(len(values), -1)
    gripper = _closure(values[:, width], options) if values.shape[1] > width else np.full(len(values), np.nan)
    out = np.full((len(keep), bag_format.ACTION_DIM), np.nan)
    if convention == "delta_rpy":
        rot = _euler_matrices(values[:, 3:6])
        for j, first in enumerate(keep):
            last = min(first + stride, len(values))
            total = np.eye(3)
            for k in range(first, last):  # R_{k+1} = R_delta @ R_k: compose in order
                total = rot[k] @ total
            out[j, :3] = values[first:last, :3].sum(axis=0)
            out[j, 3:6] = matrix_to_rpy(total[None])[0]
            out[j, 6] = gripper[last - 1]
        return out.astype(np.float32)
    poses = np.tile(np.eye(4), (len(keep), 1, 1))
    poses[:, :3, 3] = values[keep, :3]
    if convention == "pose_rpy":
        poses[:, :3, :3] = _euler_matrices(values[keep, 3:6])
    else:
        quat = values[keep, 3:7]
        poses[:, :3, :3] = quat_to_matrix(quat[:, [3, 0, 1, 2]] if convention == "pose_quat_xyzw" else quat)
    out[:-1, :6] = transform_deltas(poses)
    out[:-1, 6] = gripper[keep[1:]]  # the closure the gripper reached over the step
    return out.astype(np.float32)
