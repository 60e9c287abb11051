"""The dataset on disk that trainers memory-map (format: docs/DATASET_FORMAT.md).

A dataset is a directory:

    meta.json           format version, frame shape, control rate, action names, counts, ingest history
    frames.npy          uint8 (N, H, W, 3) RGB, every frame of every episode back to back
    actions.npy         float32 (N, 7) end-effector delta from frame i to i+1 (bag_format.ACTION_NAMES);
                        NaN where unknown (action-free episodes, the last frame of each episode)
    timestamps.npy      float64 (N,) seconds since the first frame of the frame's episode
    episode_index.npy   int32 (N,) episode of each frame
    episodes.jsonl      one JSON record per episode (start, length, instruction, split, provenance, ...)
    frames.<camera>.npy the other cameras of a dataset ingested with several (meta.json "cameras"),
                        uint8 (N, H, W, 3) each, row i taken at the same time as frames.npy's row i

Format v2 (frame_codec "jpeg") keeps the frames as JPEG in shards instead (frame_shards.py):
frames/ (index.npy + shard-*.jpg) and frames.<camera>/; everything else is as in v1.

The .npy files are standard NumPy files (np.load(..., mmap_mode="r") works) with a fixed 128-byte
header, so DatasetWriter can grow them frame by frame and rewrite the row count at the end: the
whole dataset never has to fit in memory.

    ds = Dataset("runs/data/sim")                  # read-only memory maps
    ds.frames[i], ds.actions[i], ds.episodes[e]["instruction"]
    pairs = ds.pairs("train")                       # (M, 2) frame indices (i, i + window) in one episode
    Dataset("runs/data/arm", camera="/wrist/image_raw").frames   # another camera's frames, same rows
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from lapa_training.data import bag_format
from lapa_training.data.errors import IngestError
from lapa_training.data.frame_shards import ShardedFrames, ShardedFrameWriter
from lapa_training.data.growable_array import GrowableArrayFile
from lapa_training.data.images import JpegInfo, fit_square

FORMAT_NAME = "lapa-dataset"
FORMAT_VERSION = 1  # raw frames (frames.npy)
SHARDED_FORMAT_VERSION = 2  # JPEG frames in shards (frames/)
FRAME_CODECS = ("raw", "jpeg")
FRAMES_DIR = "frames"
META_JSON = "meta.json"
EPISODES_JSONL = "episodes.jsonl"
FRAMES_NPY = "frames.npy"
ACTIONS_NPY = "actions.npy"
TIMESTAMPS_NPY = "timestamps.npy"
EPISODE_INDEX_NPY = "episode_index.npy"
EPISODES_SPOOL = ".episodes.new.jsonl"  # a writer's new records until close()
SPLITS = ("train", "val", "test")


# ---------------------------------------------------------------- splits
def assign_splits(current: list[str | None], fractions: tuple[float, float, float], seed: int) -> list[str]:
    """Give every episode whose split is None a split; the others keep theirs.

    New episodes are visited in an order shuffled by seed and each goes to the split that is
    furthest below its target share (fraction * episodes so far), ties to the earlier split in
    SPLITS. So train fills first: a dataset of one episode is all train; ten episodes with
    0.8/0.1/0.1 give 8/1/1. Deterministic for a given seed and input.
    """
    fractions = np.asarray(fractions, dtype=np.float64)
    if fractions.shape != (3,) or (fractions < 0).any() or fractions.sum() <= 0:
        raise IngestError(f"bad split fractions {tuple(fractions)}: give three non-negative numbers (train,val,test)")
    fractions = fractions / fractions.sum()
    out = list(current)
    counts = np.array([sum(s == name for s in out) for name in SPLITS], dtype=np.float64)
    todo = [i for i, s in enumerate(out) if s is None]
    rng = np.random.default_rng(seed + 7919 * (len(out) - len(todo)))
    total = counts.sum()
    for i in rng.permutation(np.array(todo, dtype=np.int64)):
        total += 1
        choice = int(np.argmax(fractions * total - counts))
        counts[choice] += 1
        out[int(i)] = SPLITS[choice]
    return out


def parse_split(text: str) -> tuple[float, float, float]:
    """'0.8,0.1,0.1' -> (0.8, 0.1, 0.1); IngestError if it is not three non-negative numbers."""
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or min(parts) < 0 or sum(parts) <= 0:
        raise IngestError(f"bad --split '{text}': give train,val,test fractions, e.g. 0.8,0.1,0.1")
    return parts  # type: ignore[return-value]


def camera_file(name: str, index: int, codec: str = "raw") -> str:
    """The frames of a dataset's camera: frames.npy (raw) or frames/ (jpeg) for the first,
    frames.<name>.npy or frames.<name>/ for the others."""
    if index == 0:
        return FRAMES_NPY if codec == "raw" else FRAMES_DIR
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in name.strip("/")) or f"camera{index}"
    return f"frames.{safe}.npy" if codec == "raw" else f"frames.{safe}"


def _frame_store(path: Path, codec: str, row_shape):
    """A writer of one camera's frames, in the dataset's codec."""
    if codec == "jpeg":
        return ShardedFrameWriter(path, row_shape)
    return GrowableArrayFile(path, np.uint8, row_shape, batch_bytes=1 << 20)


# ---------------------------------------------------------------- writing
class DatasetWriter:
    """Builds a dataset episode by episode, frames streamed to disk as they come.

    mode: 'create' (the directory must not exist), 'overwrite' (replace it) or 'append' (add to the
    dataset there, which must have the same frame shape). New and overwritten datasets are built in
    a sibling staging directory and moved into place by close(), so a failed run leaves the old
    state. Appends go in place; abort() or a crash before close() leaves the old dataset intact.

        w = DatasetWriter(out, image_size=128, control_rate=10.0)
        w.add_frame(rgb)                # any size: center-cropped and resized once to image_size
        w.repeat_frame()                # the previous frame again (a camera frame held over two steps)
        w.end_episode(actions, timestamps_s, record)
        w.close()

    cameras: the names of several cameras (the first goes to frames.npy); add_frame and repeat_frame then
    take camera=name for the others, and every camera has as many rows as frames.npy per episode.
    frame_codec: "raw" (format v1, frames.npy) or "jpeg" (format v2, frame_shards.py) for a new
    dataset; an appended one keeps its own.
    """

    def __init__(self, root: str | Path, *, image_size: int = 128, control_rate: float = 10.0,
                 mode: str = "create", split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
                 seed: int = 0, run_info: dict[str, Any] | None = None, cameras: list[str] | None = None,
                 frame_codec: str = "raw"):
        self.root = Path(root).resolve()
        self.image_size = int(image_size)
        self.split_fractions = tuple(split_fractions)
        self.seed = int(seed)
        self.run_info = dict(run_info or {})
        if mode not in ("create", "overwrite", "append"):
            raise ValueError(f"unknown mode {mode}")
        if frame_codec not in FRAME_CODECS:
            raise IngestError(f"unknown frame codec {frame_codec!r}; use {' or '.join(FRAME_CODECS)}")
        exists = self.root.exists()
        is_dataset = (self.root / META_JSON).is_file()
        if mode == "create" and exists and (is_dataset or any(self.root.iterdir())):
            what = "a dataset" if is_dataset else "a non-empty directory"
            raise IngestError(f"{self.root} is {what} already; pass --overwrite to replace it or --append to add to it")
        if mode == "append" and exists and not is_dataset:
            raise IngestError(f"{self.root} exists but is not a dataset (no {META_JSON}); cannot append to it")
        self.mode = "append" if (mode == "append" and is_dataset) else ("overwrite" if exists else "create")

        if self.mode == "append":
            self.dir = self.root
            self.meta = json.loads((self.root / META_JSON).read_text())
            _check_format(self.meta, self.root)
            frame_codec = self.meta.get("frame_codec", "raw")
            self.frame_shape: tuple[int, ...] | None = tuple(self.meta["frame_shape"])
            if self.image_size and self.frame_shape != (self.image_size, self.image_size, 3):
                raise IngestError(f"{self.root} holds {self.frame_shape[1]}x{self.frame_shape[0]} frames; "
                                  f"cannot append at --image-size {self.image_size}")
            self.image_size = self.frame_shape[0] if self.image_size else 0
            existing = self.root / EPISODES_JSONL
            held = [c["name"] for c in self.meta.get("cameras", [])]
            if held != list(cameras or []) and (held or len(cameras or []) > 1):
                raise IngestError(f"{self.root} holds cameras {held or 'one camera'}; cannot append "
                                  f"{list(cameras or []) or 'one camera'} (give the same --image-topic list)")
        else:
            self.dir = self.root.parent / f".{self.root.name}.incomplete"
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir.mkdir(parents=True)
            self.frame_shape = (self.image_size, self.image_size, 3) if self.image_size else None
            self.meta = {"format": FORMAT_NAME,
                         "format_version": FORMAT_VERSION if frame_codec == "raw" else SHARDED_FORMAT_VERSION,
                         "frame_codec": frame_codec,
                         "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "image_size": self.image_size,
                         "frame_shape": list(self.frame_shape) if self.frame_shape else None,
                         "resize": "center-crop to square, then cv2.INTER_AREA" if self.image_size else "none",
                         "control_rate_hz": float(control_rate), "action_names": list(bag_format.ACTION_NAMES),
                         "action_frame": bag_format.BASE_FRAME, "split_fractions": list(self.split_fractions),
                         "split_seed": self.seed, "ingests": []}
            existing = None
        self.records = EpisodeRecords(existing, self.dir / EPISODES_SPOOL)
        self.frame_codec = frame_codec
        self.frames = _frame_store(self.dir / camera_file("", 0, frame_codec), frame_codec, self.frame_shape)
        self.actions = GrowableArrayFile(self.dir / ACTIONS_NPY, np.float32, (bag_format.ACTION_DIM,))
        self.timestamps = GrowableArrayFile(self.dir / TIMESTAMPS_NPY, np.float64, ())
        self.episode_index = GrowableArrayFile(self.dir / EPISODE_INDEX_NPY, np.int32, ())
        self.cameras = list(cameras or []) if len(cameras or []) > 1 else []
        shapes = {c["name"]: c.get("frame_shape") for c in self.meta.get("cameras", [])}
        self.extra: dict[str, Any] = {
            name: _frame_store(self.dir / camera_file(name, i, frame_codec), frame_codec,
                               tuple(shapes[name]) if shapes.get(name) else self.frame_shape)
            for i, name in enumerate(self.cameras) if i > 0}
        self._last_extra: dict[str, np.ndarray | bytes] = {}  # bytes: a JPEG stored as recorded
        self._files = (self.frames, self.actions, self.timestamps, self.episode_index, *self.extra.values())
        self._start_counts = (len(self.records), self.frames.rows)
        self._episode_start: int | None = None
        self._last_frame: np.ndarray | bytes | None = None
        self._closed = False

    @property
    def num_frames(self) -> int:
        return self.frames.rows

    # ---------------------------------------------------------------- episodes
    def begin_episode(self) -> None:
        if self._episode_start is not None:
            raise RuntimeError("begin_episode() twice without end_episode()/abort_episode()")
        self._episode_start = self.frames.rows
        self._last_frame = None

    def add_frame(self, rgb: np.ndarray, camera: str | None = None) -> None:
        """Append one RGB uint8 frame (H, W, 3), resized to the dataset's frame shape here (once).

        The first frame after end_episode() starts a new episode (begin_episode() is implied).
        camera: one of the other cameras (see the class docstring); None for the first.
        """
        if self._episode_start is None:
            self.begin_episode()
        if camera is not None and camera in self.extra:
            self._add_extra(rgb, camera)
            return
        frame = fit_square(rgb, self.image_size)
        if frame.flags.writeable and np.may_share_memory(frame, rgb):
            frame = frame.copy()  # written later (batched): the caller may reuse its buffer meanwhile
        if self.frame_shape is None:  # image_size 0: the first frame fixes the shape
            self._set_frame_shape(tuple(frame.shape))
        if frame.shape != self.frame_shape:
            raise IngestError(f"frame of {frame.shape[1]}x{frame.shape[0]} does not match the dataset's "
                              f"{self.frame_shape[1]}x{self.frame_shape[0]} (use --image-size to resize)")
        self.frames.append(frame)
        self._last_frame = frame

    def add_jpeg(self, data: bytes, info: JpegInfo, camera: str | None = None) -> bool:
        """Store a camera's JPEG as it is when the dataset keeps JPEG frames of its size (no decode, no
        second lossy encode); False when it does not, and the caller adds the decoded frame instead."""
        if self.frame_codec != "jpeg" or info.components != 3 or info.exif:
            return False
        shape = (info.height, info.width, 3)
        if self.image_size and shape != (self.image_size, self.image_size, 3):
            return False
        extra = self.extra.get(camera) if camera is not None else None
        held = extra.row_shape if extra is not None else self.frame_shape
        if held is not None and shape != held:
            return False  # add_frame reports the mismatch with its own message
        if self._episode_start is None:
            self.begin_episode()
        data = bytes(data)
        if extra is not None:
            extra.append_encoded(data, shape)
            self._last_extra[camera] = data
            return True
        if self.frame_shape is None:
            self._set_frame_shape(shape)
        self.frames.append_encoded(data, shape)
        self._last_frame = data
        return True

    @staticmethod
    def _append_again(store, last: np.ndarray | bytes) -> None:
        if isinstance(last, bytes):
            store.append_encoded(last, store.row_shape)
        else:
            store.append(last)

    def _set_frame_shape(self, shape: tuple[int, ...]) -> None:
        self.frame_shape = shape
        self.frames.row_shape = shape
        self.meta["frame_shape"] = list(shape)

    def _add_extra(self, rgb: np.ndarray, camera: str) -> None:
        out = self.extra[camera]
        frame = fit_square(rgb, self.image_size)
        if frame.flags.writeable and np.may_share_memory(frame, rgb):
            frame = frame.copy()
        if out.row_shape is None:
            out.row_shape = tuple(frame.shape)
        if frame.shape != out.row_shape:
            raise IngestError(f"camera {camera}: frame of {frame.shape[1]}x{frame.shape[0]} does not match the "
                              f"dataset's {out.row_shape[1]}x{out.row_shape[0]} (use --image-size to resize)")
        out.append(frame)
        self._last_extra[camera] = frame

    def repeat_frame(self, camera: str | None = None) -> None:
        """Append the previous frame of this episode again (no decode, no resize, no copy)."""
        if camera is not None and camera in self.extra:
            if camera not in self._last_extra:
                raise RuntimeError(f"repeat_frame({camera!r}) before add_frame()")
            self._append_again(self.extra[camera], self._last_extra[camera])
            return
        if self._last_frame is None:
            raise RuntimeError("repeat_frame() before add_frame()")
        self._append_again(self.frames, self._last_frame)

    def add_frames(self, frames: np.ndarray, camera: str | None = None) -> None:
        """Append frames (n, H, W, 3) that already have the dataset's shape (used to merge datasets)."""
        if self._episode_start is None:
            self.begin_episode()
        if camera is not None and camera in self.extra:
            out = self.extra[camera]
            out.row_shape = out.row_shape or tuple(frames.shape[1:])
            if tuple(frames.shape[1:]) != out.row_shape:
                raise IngestError(f"camera {camera}: frames of shape {frames.shape[1:]} do not match the "
                                  f"dataset's {out.row_shape}")
            out.append(frames)
            return
        if self.frame_shape is None:
            self._set_frame_shape(tuple(frames.shape[1:]))
        if tuple(frames.shape[1:]) != self.frame_shape:
            raise IngestError(f"frames of shape {frames.shape[1:]} do not match the dataset's {self.frame_shape}")
        self.frames.append(frames)

    def merge_part(self, path: str | Path) -> list[dict[str, Any]]:
        """Append every episode of the dataset at path, which this ingest's worker made with the same
        settings: JPEG shards are moved in (the part is used up), raw frames copied; splits are left
        to close(), as for episodes ingested here. Returns the new records."""
        if self._episode_start is not None:
            raise RuntimeError("merge_part() inside an episode")
        part = Dataset(path)
        if part.meta.get("frame_codec", "raw") != self.frame_codec or part.cameras != self.cameras:
            raise IngestError(f"{path}: a part of another codec or cameras than {self.root}")
        shape = tuple(part.meta["frame_shape"])
        if self.frame_shape is None:
            self._set_frame_shape(shape)
        if shape != tuple(self.frame_shape):
            raise IngestError(f"{path}: frames of {shape[1]}x{shape[0]}, this dataset's are "
                              f"{self.frame_shape[1]}x{self.frame_shape[0]} (sources of several sizes need --image-size)")
        base, first_episode = self.frames.rows, len(self.records)
        stores = [(self.frames, part.root / camera_file("", 0, self.frame_codec), part.frames)]
        for i, name in enumerate(self.cameras[1:], start=1):
            stores.append((self.extra[name], part.root / camera_file(name, i, self.frame_codec),
                           Dataset(path, camera=name).frames))
        for store, source, frames in stores:
            if self.frame_codec == "jpeg":
                if store.row_shape is None:
                    store.row_shape = tuple(frames.shape[1:])
                store.adopt(source)
            else:
                for chunk in iter_chunks(len(frames), 256):
                    store.append(np.asarray(frames[chunk]))
        self.actions.append(np.asarray(part.actions))
        self.timestamps.append(np.asarray(part.timestamps))
        self.episode_index.append(np.asarray(part.episode_index) + first_episode)
        records = []
        for e in part.episodes:
            rec = {**e, "index": len(self.records), "start": e["start"] + base, "split": None}
            self.records.add(rec)
            records.append(rec)
        return records

    def end_episode(self, actions: np.ndarray, timestamps_s: np.ndarray, record: dict[str, Any]) -> dict[str, Any]:
        """Finish the episode whose frames were just added; returns its record (index, start, length added).

        actions (n, 7) float32-able, NaN where unknown; timestamps_s (n,) seconds since its first frame;
        record: instruction, has_actions, fps, window_frames, provenance, ... (split is assigned at close()).
        """
        start = self._episode_start
        if start is None:
            raise RuntimeError("end_episode() without begin_episode()")
        n = self.frames.rows - start
        for name, out in self.extra.items():
            if out.rows != self.frames.rows:
                raise ValueError(f"camera {name} has {out.rows - start} frames in this episode, the first {n}")
        actions = np.asarray(actions, dtype=np.float32).reshape(-1, bag_format.ACTION_DIM)
        if len(actions) != n or len(timestamps_s) != n:
            raise ValueError(f"episode has {n} frames but {len(actions)} actions and {len(timestamps_s)} timestamps")
        index = len(self.records)
        self.actions.append(actions)
        self.timestamps.append(np.asarray(timestamps_s, dtype=np.float64))
        self.episode_index.append(np.full(n, index, dtype=np.int32))
        rec = {"index": index, "start": start, "length": n, **record}
        rec.setdefault("split", None)
        self.records.add(rec)
        self._episode_start = None
        return rec

    def abort_episode(self) -> None:
        """Drop the frames of the episode in progress (it failed); the dataset is as before begin_episode()."""
        if self._episode_start is not None:
            for f in (self.frames, *self.extra.values()):
                f.truncate(self._episode_start)
            self._episode_start = None

    # ---------------------------------------------------------------- finishing
    def close(self, run_record: dict[str, Any] | None = None) -> Path:
        """Assign splits to the new episodes, write headers, episodes.jsonl and meta.json; move into place."""
        if self._closed:
            return self.root
        self.abort_episode()
        splits = assign_splits(self.records.splits, self.split_fractions, self.seed)
        for f in self._files:
            f.close()
        n_new = len(self.records) - self._start_counts[0]
        self.meta["frame_shape"] = list(self.frame_shape) if self.frame_shape else None
        if self.cameras:
            self.meta["cameras"] = [
                {"name": name, "file": camera_file(name, i, self.frame_codec),
                 "frame_shape": list(self.frame_shape if i == 0 else self.extra[name].row_shape or ()) or None}
                for i, name in enumerate(self.cameras)]
        self.meta["ingests"].append({"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **self.run_info,
                                     **(run_record or {}), "episodes_added": n_new,
                                     "frames_added": self.frames.rows - self._start_counts[1]})
        self.records.write(self.dir / EPISODES_JSONL, splits)
        self.meta.update(self.records.counts(self.frames.rows))
        _write_text(self.dir / META_JSON, json.dumps(self.meta, indent=2) + "\n")
        if self.mode != "append":
            if self.root.exists():
                old = self.root.parent / f".{self.root.name}.old"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(self.root, old)
                os.replace(self.dir, self.root)
                shutil.rmtree(old, ignore_errors=True)
            else:
                self.root.parent.mkdir(parents=True, exist_ok=True)
                os.replace(self.dir, self.root)
        self._closed = True
        return self.root

    def abort(self) -> None:
        """Give up: a new dataset is removed, an appended one is left as it was before this writer."""
        if self._closed:
            return
        self._closed = True
        n_frames = self._start_counts[1]
        for f in self._files:
            try:
                if self.mode == "append":
                    f.truncate(n_frames)
            finally:
                f.close(write_header=False)  # an appended file's header still says the old row count
        self.records.discard()
        if self.mode != "append":
            shutil.rmtree(self.dir, ignore_errors=True)


class EpisodeRecords:
    """The episode records of a dataset being written. New ones go to a spool file as they come; of
    every record only its split, length and whether it has actions stay in memory, which is what
    close() needs: memory does not grow with the records' size (about 8 KB each for a bag's)."""

    def __init__(self, existing: Path | None, spool: Path):
        self.existing = existing
        self.splits: list[str | None] = []
        self.lengths: list[int] = []
        self.with_actions: list[bool] = []
        if existing is not None:
            with open(existing) as f:
                for line in f:
                    if line.strip():
                        self._note(json.loads(line))
        self.old = len(self.splits)
        self.spool_path = spool
        self._spool = open(spool, "w")

    def _note(self, record: dict[str, Any]) -> None:
        self.splits.append(record.get("split"))
        self.lengths.append(int(record["length"]))
        self.with_actions.append(bool(record.get("has_actions")))

    def __len__(self) -> int:
        return len(self.splits)

    def add(self, record: dict[str, Any]) -> None:
        self._spool.write(json.dumps(record, sort_keys=True) + "\n")
        self._note(record)

    def write(self, path: Path, splits: list[str]) -> None:
        """episodes.jsonl at path: the records there before, then the new ones with their splits."""
        self._spool.close()
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w") as out:
            if self.existing is not None:
                with open(self.existing) as f:
                    shutil.copyfileobj(f, out)
            with open(self.spool_path) as f:
                for i, line in enumerate(f, start=self.old):
                    record = json.loads(line)
                    record["split"] = splits[i]
                    out.write(json.dumps(record, sort_keys=True) + "\n")
        os.replace(tmp, path)
        self.splits = list(splits)
        self.spool_path.unlink(missing_ok=True)

    def discard(self) -> None:
        self._spool.close()
        self.spool_path.unlink(missing_ok=True)

    def counts(self, num_frames: int) -> dict[str, Any]:
        return {"num_frames": int(num_frames), "num_episodes": len(self),
                "num_episodes_with_actions": sum(self.with_actions),
                "episodes_per_split": {s: sum(x == s for x in self.splits) for s in SPLITS},
                "frames_per_split": {s: sum(n for n, x in zip(self.lengths, self.splits) if x == s) for s in SPLITS}}


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _check_format(meta: dict[str, Any], root: Path) -> None:
    version = meta.get("format_version")
    if meta.get("format") != FORMAT_NAME or version not in (FORMAT_VERSION, SHARDED_FORMAT_VERSION) or \
            meta.get("frame_codec", "raw") != ("raw" if version == FORMAT_VERSION else "jpeg"):
        raise IngestError(f"{root}: not a {FORMAT_NAME} v{FORMAT_VERSION} or v{SHARDED_FORMAT_VERSION} dataset "
                          f"(meta.json says {meta.get('format')} v{version}, frames {meta.get('frame_codec', 'raw')})")


def read_episodes(root: str | Path, fields: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """The episode records of the dataset at root, in index order; with fields, only those keys of
    each (a bag's full record takes about 8 KB in memory: a corpus of 200k episodes, gigabytes)."""
    out = []
    with open(Path(root) / EPISODES_JSONL) as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                out.append(record if fields is None else {k: record[k] for k in fields if k in record})
    return out


def is_dataset(path: str | Path) -> bool:
    path = Path(path)
    return (path / META_JSON).is_file() and ((path / FRAMES_NPY).is_file() or (path / FRAMES_DIR / "index.npy").is_file())


# ---------------------------------------------------------------- reading
class Dataset:
    """A dataset opened read-only; arrays are np.memmap views, nothing is loaded up front.

    frames (N, H, W, 3) uint8 RGB; actions (N, 7) float32 (NaN = unknown; row i is the step from
    frame i to i+1, so the last row of every episode is NaN); timestamps (N,) float64 seconds since
    the episode's first frame; episode_index (N,) int32; episodes: list of records (dicts, see
    docs/DATASET_FORMAT.md); meta: meta.json. camera picks one camera of a dataset ingested with several
    (names in .cameras); frames are then that camera's. fields keeps only those keys of each episode
    record (a job that needs a few, on a large corpus).
    """

    def __init__(self, root: str | Path, camera: str | None = None, fields: tuple[str, ...] | None = None):
        self.root = Path(root)
        if not (self.root / META_JSON).is_file():
            raise IngestError(f"{self.root} is not a dataset (no {META_JSON})")
        self.meta: dict[str, Any] = json.loads((self.root / META_JSON).read_text())
        _check_format(self.meta, self.root)
        self.episodes = read_episodes(self.root, fields)
        self.cameras = [c["name"] for c in self.meta.get("cameras", [])]
        self.camera = camera or (self.cameras[0] if self.cameras else None)
        if camera is not None and camera not in self.cameras:
            raise IngestError(f"{self.root}: no camera '{camera}' (" + (
                f"cameras: {', '.join(self.cameras)})" if self.cameras else "the dataset has one camera, unnamed)"))
        codec = self.meta.get("frame_codec", "raw")
        file = self.meta["cameras"][self.cameras.index(camera)]["file"] if camera else camera_file("", 0, codec)
        if codec == "jpeg":
            shape = (self.meta["cameras"][self.cameras.index(camera)].get("frame_shape") if camera else None) \
                or self.meta["frame_shape"]
            self.frames = ShardedFrames(self.root / file, tuple(shape))
        else:
            self.frames = _load(self.root / file)
        self.actions = _load(self.root / ACTIONS_NPY)
        self.timestamps = _load(self.root / TIMESTAMPS_NPY)
        self.episode_index = _load(self.root / EPISODE_INDEX_NPY)
        n = len(self.frames)
        if not (len(self.actions) == len(self.timestamps) == len(self.episode_index) == n) or \
                sum(e["length"] for e in self.episodes) != n:
            raise IngestError(f"{self.root}: array lengths disagree (frames {n}, actions {len(self.actions)}, "
                              f"episodes cover {sum(e['length'] for e in self.episodes)}); the dataset is damaged")

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def num_episodes(self) -> int:
        return len(self.episodes)

    @property
    def action_names(self) -> tuple[str, ...]:
        return tuple(self.meta["action_names"])

    def episode_slice(self, index: int) -> slice:
        """Frame indices of episode `index` as a slice into frames/actions/timestamps."""
        e = self.episodes[index]
        return slice(e["start"], e["start"] + e["length"])

    def split_episodes(self, split: str | None = None) -> list[dict[str, Any]]:
        """Records of the episodes in split ('train', 'val', 'test'), or all for None."""
        if split is not None and split not in SPLITS:
            raise ValueError(f"unknown split '{split}'; use one of {', '.join(SPLITS)}")
        return [e for e in self.episodes if split is None or e["split"] == split]

    def pairs(self, split: str | None = None, window_frames: int | None = None,
              require_actions: bool = False) -> np.ndarray:
        """Frame index pairs (i, i + H) with both frames in the same episode, (M, 2) int64.

        H is window_frames, or else each episode's own window_frames (its LAQ window in stored
        frames). Episodes shorter than H + 1 frames contribute nothing. require_actions keeps only
        episodes with actions.
        """
        chunks = []
        for e in self.split_episodes(split):
            if require_actions and not e.get("has_actions"):
                continue
            h = int(window_frames or e["window_frames"])
            if h <= 0:
                raise ValueError("window_frames must be positive")
            first = np.arange(e["start"], e["start"] + e["length"] - h, dtype=np.int64)
            chunks.append(np.stack([first, first + h], axis=1))
        return np.concatenate(chunks) if chunks else np.zeros((0, 2), dtype=np.int64)

    def instructions(self, split: str | None = None) -> list[str]:
        return [e["instruction"] for e in self.split_episodes(split)]

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())


def _load(path: Path) -> np.ndarray:
    try:
        with open(path, "rb") as f:  # an empty array cannot be memory-mapped: return it in memory
            np.lib.format.read_magic(f)
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        if shape[0] == 0:
            return np.zeros(shape, dtype)
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise IngestError(f"{path}: cannot memory-map ({e})") from e


def gather_frames(datasets: "list[Dataset]", which: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Frames datasets[which[j]].frames[index[j]] for every j, as one uint8 (B, H, W, 3) array
    (all datasets must share a frame size). Each dataset's memmap is read in file order."""
    out = None
    for k in np.unique(which):
        sel = np.nonzero(which == k)[0]
        idx = index[sel]
        order = np.argsort(idx, kind="stable")
        frames = datasets[int(k)].frames
        if out is None:
            out = np.empty((len(which),) + frames.shape[1:], dtype=np.uint8)
        out[sel[order]] = frames[idx[order]]
    if out is None:
        raise ValueError("gather_frames: no frames asked for")
    return out


def iter_chunks(n: int, chunk: int) -> Iterable[slice]:
    for start in range(0, n, chunk):
        yield slice(start, min(n, start + chunk))


def summarize(ds: Dataset) -> dict[str, Any]:
    """What `lapa data info` shows, as plain JSON-able data."""
    from collections import Counter

    eps = ds.episodes
    n = len(ds)
    # action statistics over finite values, in chunks (never the whole array in memory)
    dim = len(ds.action_names)
    count, total, total_sq = np.zeros(dim), np.zeros(dim), np.zeros(dim)
    low, high = np.full(dim, np.inf), np.full(dim, -np.inf)
    for sl in iter_chunks(n, 1 << 20):
        a = np.asarray(ds.actions[sl], dtype=np.float64)
        finite = np.isfinite(a)
        z = np.where(finite, a, 0.0)
        count += finite.sum(0)
        total += z.sum(0)
        total_sq += (z * z).sum(0)
        low = np.minimum(low, np.where(finite, a, np.inf).min(0, initial=np.inf))
        high = np.maximum(high, np.where(finite, a, -np.inf).max(0, initial=-np.inf))
    mean = np.divide(total, count, out=np.full(dim, np.nan), where=count > 0)
    std = np.sqrt(np.maximum(np.divide(total_sq, count, out=np.full(dim, np.nan), where=count > 0) - mean ** 2, 0))
    stats = {name: {"count": int(count[i]), "mean": _num(mean[i]), "std": _num(std[i]),
                    "min": _num(low[i]) if count[i] else None, "max": _num(high[i]) if count[i] else None}
             for i, name in enumerate(ds.action_names)}
    kinds = Counter(f"{e.get('provenance', {}).get('kind', '?')}/{e.get('provenance', {}).get('storage', '?')}"
                    for e in eps)
    known = [e["success"] for e in eps if isinstance(e.get("success"), bool)]
    shape = ds.meta.get("frame_shape") or list(ds.frames.shape[1:])
    return {
        "path": str(ds.root), "format": f"{ds.meta['format']} v{ds.meta['format_version']}",
        "disk_bytes": ds.disk_bytes(), "frames": n, "frame_shape": shape, "cameras": ds.cameras,
        "control_rate_hz": ds.meta.get("control_rate_hz"),
        "episodes": len(eps), "episodes_with_actions": sum(bool(e["has_actions"]) for e in eps),
        "episodes_without_actions": sum(not e["has_actions"] for e in eps),
        "success": {"known": len(known), "succeeded": sum(known)},
        "splits": {s: {"episodes": sum(e["split"] == s for e in eps),
                       "frames": sum(e["length"] for e in eps if e["split"] == s),
                       "pairs": int(len(ds.pairs(s)))} for s in SPLITS},
        "tasks": dict(sorted(Counter(e.get("task") or "(none)" for e in eps).items())),
        "instructions": len([e for e in eps if e.get("instruction")]),
        "distinct_instructions": len({e.get("instruction") for e in eps if e.get("instruction")}),
        "sources": dict(sorted(kinds.items())),
        "fps": dict(sorted(Counter(f"{e['fps']:g}" for e in eps).items())),
        "window_frames": dict(sorted(Counter(str(e["window_frames"]) for e in eps).items())),
        "action_stats": stats,
    }


def _num(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None
