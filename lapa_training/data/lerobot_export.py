"""A lapa dataset, or a folder of bags, as a LeRobot v3.0 dataset (lerobot_format.py), for LeRobot's
trainers and the Hugging Face hub:

    lapa data export runs/data/demo --format lerobot --out runs/lerobot/demo
    lapa data export runs/bags/ --format lerobot --out runs/lerobot/bags       # bags: ingested first

Every camera becomes an ``observation.images.<camera>`` video feature (mp4, AV1 as lerobot encodes
it, or H.264), the 7-D end-effector deltas the ``action`` feature (a step lapa does not know, as
an episode's last, becomes a hold: LeRobot has an action on every frame), each episode's
instruction its task. The dataset is built in a sibling staging folder and moved into place at the end, so a failed
export leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lapa_training.data import bag_format
from lapa_training.data import lerobot_format as fmt
from lapa_training.data.dataset import Dataset, is_dataset
from lapa_training.data.errors import IngestError

CODECS = {"av1": "libsvtav1", "h264": "libx264"}  # --codec -> PyAV encoder
STATS_SAMPLE_FRAMES = 20  # frames per episode for the image statistics, as lerobot samples them


@dataclass
class ExportReport:
    out: Path
    episodes: int = 0
    frames: int = 0
    cameras: list[str] = field(default_factory=list)  # the video feature keys
    with_actions: bool = True
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.episodes} episodes, {self.frames} frames, {len(self.cameras)} camera(s) "
                f"({', '.join(self.cameras)}) -> {self.out} (LeRobot {fmt.CODEBASE_VERSION}) in {self.seconds:.1f} s")


def export_lerobot(source: str | Path, out: str | Path, *, codec: str = "av1", robot_type: str | None = None,
                   overwrite: bool = False, image_size: int = 0, progress: bool = True) -> ExportReport:
    """Export a lapa dataset, or the bags under a folder (ingested first at image_size, 0 = as
    recorded), to a LeRobot v3.0 dataset at out. IngestError names what is wrong."""
    source, out = Path(source), Path(out)
    t0 = time.perf_counter()
    if codec not in CODECS:
        raise IngestError(f"unknown codec {codec!r}; use {' or '.join(CODECS)}")
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise IngestError(f"{out} exists; pass --overwrite to replace it")
    if not source.exists():
        raise IngestError(f"{source}: no such file or directory")
    staging = out.parent / f".{out.name}.incomplete"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        if is_dataset(source):
            report = _export(Dataset(source), staging, codec, robot_type, progress)
        else:  # bags (or videos): through ingest, into a dataset beside the staging folder
            from lapa_training.data.ingest import IngestOptions, ingest

            ingested = staging.parent / f".{out.name}.ingest"
            shutil.rmtree(ingested, ignore_errors=True)
            try:
                ingest([source], ingested, IngestOptions(image_size=image_size, progress=progress))
                report = _export(Dataset(ingested), staging, codec, robot_type, progress)
            finally:
                shutil.rmtree(ingested, ignore_errors=True)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    report.out = out
    report.seconds = time.perf_counter() - t0
    return report


def _camera_names(ds: Dataset) -> list[str]:
    """The dataset's camera names: its list, else the image topic its first episode came from."""
    if ds.cameras:
        return list(ds.cameras)
    topics = (ds.episodes[0].get("provenance") or {}).get("topics") or {}
    return [topics.get("image") or "camera"]


def _fps(ds: Dataset) -> int:
    rates = {round(float(e.get("fps") or ds.meta.get("control_rate_hz") or 0.0), 6) for e in ds.episodes}
    if len(rates) != 1:
        raise IngestError(f"{ds.root}: episodes at several frame rates ({', '.join(map(str, sorted(rates)))} Hz); "
                          f"a LeRobot dataset has one: export them separately")
    fps = rates.pop()
    if fps <= 0 or abs(fps - round(fps)) > 1e-6:
        raise IngestError(f"{ds.root}: frames at {fps} Hz; a LeRobot dataset needs a whole number of frames per second")
    return int(round(fps))


def _export(ds: Dataset, root: Path, codec: str, robot_type: str | None, progress: bool) -> ExportReport:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm import tqdm

    if not ds.episodes:
        raise IngestError(f"{ds.root}: no episodes to export")
    fps = _fps(ds)
    height, width = (int(v) for v in ds.frames.shape[1:3])
    names = _camera_names(ds)
    keys = [fmt.camera_key(n) for n in names]
    if len(set(keys)) != len(keys):
        raise IngestError(f"{ds.root}: cameras {names} give the same LeRobot key")
    cameras = {key: (ds.frames if i == 0 else Dataset(ds.root, camera=name).frames)
               for i, (key, name) in enumerate(zip(keys, names))}
    for key, frames in cameras.items():
        if frames.shape[1] % 2 or frames.shape[2] % 2:
            raise IngestError(f"{ds.root}: {key} frames are {frames.shape[2]}x{frames.shape[1]}; video needs even "
                              f"sizes (ingest again with an even --image-size)")
    with_actions = [bool(e.get("has_actions")) for e in ds.episodes]
    if any(with_actions) and not all(with_actions):
        raise IngestError(f"{ds.root}: {sum(with_actions)} of {len(with_actions)} episodes have actions; a LeRobot "
                          f"dataset's 'action' is every frame's: export those with actions separately")
    report = ExportReport(out=root, cameras=keys, with_actions=all(with_actions))
    if not report.with_actions:
        report.warnings.append("no episode has actions: the export has no 'action' feature (fine for latent "
                               "pretraining; LeRobot policies need actions)")
    task_of: dict[str, int] = {}
    for e in ds.episodes:
        task_of.setdefault(e.get("instruction") or "", len(task_of))
    tasks = list(task_of)

    os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints its whole configuration otherwise
    videos = {key: _VideoFiles(root, key, codec, fps) for key in keys}
    data_rows: list[Any] = []
    episode_rows = []
    index = 0
    all_actions, sampled = [], {key: [] for key in keys}
    bar = tqdm(ds.episodes, desc="exporting", unit="ep", disable=not progress, file=sys.stderr)
    try:
        for e in bar:
            sl = ds.episode_slice(e["index"])
            n = sl.stop - sl.start
            ep_index = len(episode_rows)
            actions = _hold_unknown(np.asarray(ds.actions[sl], dtype=np.float32)) if report.with_actions else None
            frame_index = np.arange(n, dtype=np.int64)
            columns = {"timestamp": (frame_index / fps).astype(np.float32), "frame_index": frame_index,
                       "episode_index": np.full(n, ep_index, np.int64), "index": np.arange(index, index + n),
                       "task_index": np.full(n, task_of[e.get("instruction") or ""], np.int64)}
            if report.with_actions:
                columns["action"] = actions
                all_actions.append(actions)
            data_rows.append(columns)
            row = {"episode_index": ep_index, "tasks": [tasks[columns["task_index"][0]]], "length": n,
                   "data/chunk_index": 0, "data/file_index": 0,
                   "dataset_from_index": index, "dataset_to_index": index + n}
            for key, frames in cameras.items():
                clip = np.asarray(frames[sl])
                chunk, file, start = videos[key].add(clip)
                row.update({f"videos/{key}/chunk_index": chunk, f"videos/{key}/file_index": file,
                            f"videos/{key}/from_timestamp": start / fps,
                            f"videos/{key}/to_timestamp": (start + n) / fps})
                pick = clip[np.linspace(0, n - 1, min(n, STATS_SAMPLE_FRAMES)).astype(int)]
                sampled[key].append(pick)
                row.update(_prefixed(f"stats/{key}", fmt.image_stats(pick)))
            for name, values in columns.items():
                row.update(_prefixed(f"stats/{name}", fmt.feature_stats(values.reshape(n, -1))))
            row["meta/episodes/chunk_index"], row["meta/episodes/file_index"] = 0, 0
            episode_rows.append(row)
            index += n
    finally:
        for v in videos.values():
            v.close()

    features: dict[str, Any] = {}
    for key in keys:
        features[key] = {"dtype": "video", "shape": [height, width, 3], "names": ["height", "width", "channels"],
                         "info": {"video.height": height, "video.width": width, "video.codec": codec,
                                  "video.pix_fmt": "yuv420p", "video.is_depth_map": False, "video.fps": fps,
                                  "video.channels": 3, "has_audio": False}}
    if report.with_actions:
        features["action"] = {"dtype": "float32", "shape": [bag_format.ACTION_DIM],
                              "names": list(bag_format.ACTION_NAMES)}
    features.update(json.loads(json.dumps(fmt.DEFAULT_FEATURES)))

    table = _data_table(data_rows, report.with_actions)
    path = root / fmt.DATA_PATH.format(chunk_index=0, file_index=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    path = root / fmt.EPISODES_PATH.format(chunk_index=0, file_index=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(episode_rows), path)
    fmt.write_tasks(root, tasks)

    stats = {key: fmt.image_stats(np.concatenate(sampled[key])) for key in keys}
    for name in ("timestamp", "frame_index", "episode_index", "index", "task_index"):
        stats[name] = fmt.feature_stats(np.concatenate([c[name] for c in data_rows]).reshape(-1, 1))
    if report.with_actions:
        stats["action"] = fmt.feature_stats(np.concatenate(all_actions))
    (root / fmt.STATS_JSON).write_text(json.dumps(stats, indent=4) + "\n")
    info = {"codebase_version": fmt.CODEBASE_VERSION, "robot_type": robot_type or _robot_type(ds),
            "total_episodes": len(episode_rows), "total_frames": index, "total_tasks": len(tasks),
            "chunks_size": fmt.CHUNKS_SIZE, "data_files_size_in_mb": fmt.DATA_FILE_SIZE_MB,
            "video_files_size_in_mb": fmt.VIDEO_FILE_SIZE_MB, "fps": fps,
            "splits": {"train": f"0:{len(episode_rows)}"}, "data_path": fmt.DATA_PATH, "video_path": fmt.VIDEO_PATH,
            "features": features}
    (root / fmt.INFO_JSON).write_text(json.dumps(info, indent=4) + "\n")
    report.episodes, report.frames = len(episode_rows), index
    return report


def _hold_unknown(actions: np.ndarray) -> np.ndarray:
    """LeRobot has an action on every frame: a step lapa does not know (an episode's last frame, which has
    no next one) becomes a hold, no motion and the gripper as in the step before."""
    out = actions.copy()
    for i in np.flatnonzero(~np.isfinite(out).all(axis=1)):
        gripper = out[i - 1, 6] if i > 0 and np.isfinite(out[i - 1, 6]) else (out[i, 6] if np.isfinite(out[i, 6]) else 0.0)
        out[i] = 0.0
        out[i, 6] = gripper
    return out


def _prefixed(prefix: str, stats: dict[str, list]) -> dict[str, list]:
    return {f"{prefix}/{k}": v for k, v in stats.items()}


def _robot_type(ds: Dataset) -> str | None:
    robots = {(e.get("provenance") or {}).get("robot") for e in ds.episodes} - {None}
    return robots.pop() if len(robots) == 1 else None


def _data_table(rows: list[dict[str, np.ndarray]], with_actions: bool):
    """One parquet table of every frame: scalars as their type, the action as fixed_size_list<float32>[7]."""
    import pyarrow as pa

    def cat(name):
        return np.concatenate([r[name] for r in rows])

    columns = {}
    if with_actions:
        flat = pa.array(cat("action").reshape(-1), pa.float32())
        columns["action"] = pa.FixedSizeListArray.from_arrays(flat, bag_format.ACTION_DIM)
    columns["timestamp"] = pa.array(cat("timestamp"), pa.float32())
    for name in ("frame_index", "episode_index", "index", "task_index"):
        columns[name] = pa.array(cat(name), pa.int64())
    return pa.table(columns)


class _VideoFiles:
    """One camera's mp4 files: episodes appended to the current file, a new one past the size limit."""

    def __init__(self, root: Path, key: str, codec: str, fps: int):
        self.root, self.key, self.codec, self.fps = root, key, codec, fps
        self.chunk, self.file, self.frames_in_file = 0, -1, 0
        self.container = self.stream = self.path = None

    def _open(self, height: int, width: int) -> None:
        import av

        self.close()
        self.file += 1
        if self.file == fmt.CHUNKS_SIZE:
            self.chunk, self.file = self.chunk + 1, 0
        self.path = self.root / fmt.VIDEO_PATH.format(video_key=self.key, chunk_index=self.chunk, file_index=self.file)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.container = av.open(str(self.path), "w")
        self.stream = self.container.add_stream(CODECS[self.codec], rate=self.fps)
        self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, "yuv420p"
        # lerobot's settings: a key frame every 2 frames (fast random access), crf 30
        self.stream.options = {"g": "2", "crf": "30", **({"preset": "12"} if self.codec == "av1" else {})}
        self.frames_in_file = 0

    def add(self, clip: np.ndarray) -> tuple[int, int, int]:
        """Encode an episode's frames (n, H, W, 3); returns (chunk, file, first frame's position in the file)."""
        import av

        written = self.path.stat().st_size if self.path is not None and self.path.exists() else 0
        if self.container is None or (written >> 20) >= fmt.VIDEO_FILE_SIZE_MB:
            self._open(clip.shape[1], clip.shape[2])
        start = self.frames_in_file
        for rgb in clip:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts = self.frames_in_file
            self.frames_in_file += 1
            for packet in self.stream.encode(frame):
                self.container.mux(packet)
        return self.chunk, self.file, start

    def close(self) -> None:
        if self.container is not None:
            for packet in self.stream.encode():
                self.container.mux(packet)
            self.container.close()
            self.container = None
