"""Frames as JPEG files in shards, with a memory-mapped index: the frame storage of dataset format v2.

    frames/index.npy        int64 (N, 3): shard number, byte offset, byte length of frame i
    frames/shard-00000.jpg  JPEG files back to back (a new shard past SHARD_BYTES)

Frame i is one JPEG, decoded on its own (random access by index, about 0.1 ms at 128 x 128); a
frame repeated (a camera slower than the control rate) is another index row to the same bytes.
The index is a growable .npy (growable_array.GrowableArrayFile): its header holds the row count, written
at flush, so rows and bytes appended by a writer that died are dropped when the files are opened
again. Datasets merge by moving shards and offsetting an index, without decoding.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from lapa_training.data.errors import IngestError
from lapa_training.data.growable_array import NPY_HEADER_BYTES, GrowableArrayFile, write_all

INDEX_NPY = "index.npy"
SHARD_BYTES = 1 << 30  # a new shard past 1 GiB: files small enough to copy and sync one at a time
JPEG_QUALITY = 90  # docs/lab-notes/dataset-format-v2.md: 15x smaller than raw at 128 px, PSNR >= 34 dB


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.jpg"


def _encode(frames: list[np.ndarray], quality: int) -> list[bytes | IngestError]:
    """Each frame's JPEG, or its error: one bad frame fails alone, not the frames batched with it."""
    import cv2

    encoded: list[bytes | IngestError] = []
    for rgb in frames:
        ok, data = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
        encoded.append(data.tobytes() if ok else IngestError(f"cannot encode a {rgb.shape} frame as JPEG"))
    return encoded


def is_sharded(path: Path) -> bool:
    return (Path(path) / INDEX_NPY).is_file()


ENCODE_THREADS = min(4, os.cpu_count() or 1)  # cv2.imencode releases the GIL: encoding overlaps reading
IN_FLIGHT = 64  # frames queued for encoding before append waits for the oldest
ENCODE_BATCH = 8  # frames per encoder task: a task's hand-off between threads costs about a frame's encoding


class _Batch:
    """Frames encoded by one encoder task; `future` is None until the batch is submitted."""

    def __init__(self):
        self.frames: list[np.ndarray] = []
        self.future = None


class ShardedFrameWriter:
    """Appends RGB frames as JPEG; the interface of GrowableArrayFile that DatasetWriter uses
    (rows, row_shape, append, truncate, flush, close). Frames are encoded on a few threads while the
    caller reads the next ones, and written in order."""

    def __init__(self, directory: Path, row_shape: tuple[int, ...] | None, quality: int = JPEG_QUALITY,
                 batch_bytes: int = 1 << 20):
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(ENCODE_THREADS, thread_name_prefix="lapa-jpeg")
        self._queue: deque = deque()  # in order: (batch, i) to encode, JPEG bytes taken as they are, None (a repeat)
        self._batch: _Batch | None = None  # the batch new frames join until it is full or needed
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.quality = int(quality)
        self.row_shape = tuple(row_shape) if row_shape is not None else None
        self.batch_bytes = batch_bytes
        self.index = GrowableArrayFile(self.dir / INDEX_NPY, np.int64, (3,))
        self._pending: list[bytes] = []  # JPEG bytes not yet written, and below their index rows
        self._pending_bytes = 0
        self._pending_rows: list[tuple[int, int, int]] = []
        self._last: np.ndarray | bytes | None = None  # the last frame appended (a repeat of it reuses its bytes)
        self._last_row: tuple[int, int, int] | None = None  # the index row of the last frame written
        self._open_shard_after(self.index.rows)

    @property
    def rows(self) -> int:
        return self.index.rows + len(self._pending_rows) + len(self._queue)

    def _open_shard_after(self, rows: int) -> None:
        """Continue the shard that holds the last of `rows` frames, cut after its last indexed byte;
        later shards (bytes no kept row refers to) are removed."""
        shard, end = self._end_of(rows)
        for path in self.dir.glob("shard-*.jpg"):
            if int(path.stem.split("-")[1]) > shard:
                path.unlink()
        self.shard = shard
        self._file = open(self.dir / shard_name(shard), "a+b", buffering=0)
        self._file.truncate(end)
        self._file.seek(0, os.SEEK_END)
        self.position = end

    def _end_of(self, rows: int) -> tuple[int, int]:
        """(shard, end byte) after the first `rows` frames: the last row's end, as bytes are written in
        row order and a repeated frame points to the bytes just before it."""
        if rows == 0:
            return 0, 0
        index = np.memmap(self.index.path, np.int64, "r", offset=NPY_HEADER_BYTES, shape=(rows, 3))
        shard, offset, length = (int(v) for v in index[rows - 1])
        del index
        return shard, offset + length

    def append(self, rows: np.ndarray) -> None:
        """One RGB frame (H, W, 3), or frames (n, H, W, 3)."""
        rows = np.asarray(rows) if not isinstance(rows, np.ndarray) else rows
        if rows.ndim == 4:
            for frame in rows:
                self.append(frame)
            return
        if self.row_shape is None:
            self.row_shape = tuple(rows.shape)
        if tuple(rows.shape) != self.row_shape or rows.dtype != np.uint8:
            raise ValueError(f"{self.dir.name}: a frame of {rows.shape} {rows.dtype}, expected {self.row_shape} uint8")
        self._push(rows, self._batched)

    def append_encoded(self, data: bytes, shape: tuple[int, ...]) -> None:
        """One frame that is already a JPEG of `shape` (H, W, 3), stored as it is: a camera's own
        JPEG needs no decode and no second lossy encode. The same bytes object again is a repeat."""
        if self.row_shape is None:
            self.row_shape = tuple(shape)
        if tuple(shape) != self.row_shape:
            raise ValueError(f"{self.dir.name}: a JPEG of {tuple(shape)}, expected {self.row_shape}")
        self._push(data, lambda data: data)

    def _push(self, frame: np.ndarray | bytes, job) -> None:
        """Queue job(frame) (what _write_next writes), or a repeat when frame is the last frame again
        (the same object: the same bytes); then write the oldest while more than IN_FLIGHT wait."""
        if self._last is not None and self._last is frame:
            self._queue.append(None)
        else:
            self._queue.append(job(frame))
            self._last = frame
        while len(self._queue) > IN_FLIGHT:
            self._write_next()

    def _batched(self, rgb: np.ndarray) -> tuple[_Batch, int]:
        """rgb joins the open encoder batch (submitted when full): its place in that batch."""
        if self._batch is None:
            self._batch = _Batch()
        place = (self._batch, len(self._batch.frames))
        self._batch.frames.append(rgb)
        if len(self._batch.frames) == ENCODE_BATCH:
            self._submit()
        return place

    def _submit(self) -> None:
        self._batch.future = self._pool.submit(_encode, self._batch.frames, self.quality)
        self._batch = None

    def _write_next(self) -> None:
        """Write the oldest queued frame: its bytes (the encoder's result) and its index row."""
        job = self._queue.popleft()
        if job is None:
            self._pending_rows.append(self._last_row)
            return
        if isinstance(job, bytes):
            data = job
        else:
            batch, i = job
            if batch.future is None:
                self._submit()
            data = batch.future.result()[i]
            if isinstance(data, IngestError):
                raise data
        if self.position + len(data) > SHARD_BYTES and self.position > 0:
            self._write_pending()
            self._file.close()
            self.shard, self.position = self.shard + 1, 0
            self._file = open(self.dir / shard_name(self.shard), "w+b", buffering=0)
        self._last_row = (self.shard, self.position, len(data))
        self._pending.append(data)
        self._pending_bytes += len(data)
        self.position += len(data)
        self._pending_rows.append(self._last_row)
        if self._pending_bytes >= self.batch_bytes:
            self._write_pending()

    def _drain(self) -> None:
        while self._queue:
            self._write_next()
        self._write_pending()

    def _write_pending(self) -> None:
        """The queued bytes, then their index rows: one write each, not a system call per frame."""
        if self._pending:
            write_all(self._file.fileno(), self._pending, self.dir / shard_name(self.shard))
            self._pending, self._pending_bytes = [], 0
        if self._pending_rows:
            self.index.append(np.asarray(self._pending_rows, np.int64))
            self._pending_rows = []

    def adopt(self, directory: Path) -> int:
        """Append every frame of another store of the same shape by moving its shards in (renumbered
        after this store's) and offsetting its index: nothing is decoded. Returns the frames added."""
        self._drain()
        index = np.load(Path(directory) / INDEX_NPY)
        if not len(index):
            return 0
        used = int(index[:, 0].max()) + 1
        self._file.close()
        base = self.shard if self.position == 0 else self.shard + 1  # an empty shard is taken over
        if self.position == 0:
            (self.dir / shard_name(self.shard)).unlink(missing_ok=True)
        for k in range(used):
            os.replace(Path(directory) / shard_name(k), self.dir / shard_name(base + k))
        rows = index.copy()
        rows[:, 0] += base
        self.index.append(rows)
        self.shard, self.position = base + used, 0
        self._file = open(self.dir / shard_name(self.shard), "w+b", buffering=0)
        self._last, self._last_row = None, None
        return len(rows)

    def truncate(self, rows: int) -> None:
        """Drop every frame from index `rows` on (a failed episode), bytes included."""
        self._drain()
        self.index.truncate(rows)
        self._file.close()
        self._last = None
        self._open_shard_after(rows)

    def flush(self) -> None:
        self._drain()
        self.index.flush()

    def close(self, write_header: bool = True) -> None:
        try:
            if write_header:
                self._drain()
                self.index.flush()
                if self.position == 0 and self.shard > 0:  # opened for frames that never came
                    (self.dir / shard_name(self.shard)).unlink(missing_ok=True)
        finally:
            for job in self._queue:
                if isinstance(job, tuple) and job[0].future is not None:
                    job[0].future.cancel()
            self._queue.clear()
            self._batch = None
            self._pool.shutdown(wait=True)
            self._pending, self._pending_bytes, self._pending_rows = [], 0, []
            self._file.close()
            self.index.close(write_header=False)


class ShardedFrames:
    """Read-only frames of a sharded store, indexed like a (N, H, W, 3) uint8 array: frames[i],
    frames[a:b], frames[index_array], np.asarray(frames). Frames are read with pread, not through a
    memory map: mapped pages count as the reader's resident memory, which then grew with every frame
    a labelling read (330 MB over 240k frames)."""

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, directory: Path, frame_shape: tuple[int, ...]):
        self.dir = Path(directory)
        try:
            self.index = np.load(self.dir / INDEX_NPY, mmap_mode="r") if _rows(self.dir / INDEX_NPY) else \
                np.zeros((0, 3), np.int64)
        except (OSError, ValueError) as e:
            raise IngestError(f"{self.dir / INDEX_NPY}: cannot memory-map ({e})") from e
        self.frame_shape = tuple(frame_shape)
        self._shards: dict[int, int] = {}  # shard number -> open file descriptor

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.index), *self.frame_shape)

    def __len__(self) -> int:
        return len(self.index)

    def _read(self, shard: int, offset: int, length: int) -> np.ndarray:
        fd = self._shards.get(shard)
        if fd is None:
            path = self.dir / shard_name(shard)
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as e:
                raise IngestError(f"{path}: cannot open ({e.strerror})") from e
            self._shards[shard] = fd
        return np.frombuffer(os.pread(fd, length, offset), np.uint8)

    def __del__(self):
        for fd in getattr(self, "_shards", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass

    def _decode_into(self, i: int, out: np.ndarray) -> None:
        import cv2

        shard, offset, length = (int(v) for v in self.index[i])
        bgr = cv2.imdecode(self._read(shard, offset, length), cv2.IMREAD_COLOR)
        if bgr is None or bgr.shape != out.shape:
            raise IngestError(f"{self.dir}: frame {i} does not decode to {out.shape} (damaged shard {shard})")
        cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB, dst=out)

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            i = int(key) + (len(self) if key < 0 else 0)
            if not 0 <= i < len(self):
                raise IndexError(f"frame {key} out of range for {len(self)} frames")
            out = np.empty(self.frame_shape, np.uint8)
            self._decode_into(i, out)
            return out
        if isinstance(key, slice):
            span = range(len(self))[key]
            rows = np.arange(span.start, span.stop, span.step, dtype=np.int64)
        else:
            rows = np.asarray(key)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        rows = rows.astype(np.int64).reshape(-1)
        rows[rows < 0] += len(self)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"frame index out of range for {len(self)} frames")
        out = np.empty((len(rows), *self.frame_shape), np.uint8)
        for j, i in enumerate(rows):
            self._decode_into(int(i), out[j])
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        frames = self[:]
        return frames if dtype is None else frames.astype(dtype)

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.dir.iterdir() if p.is_file())


def _rows(path: Path) -> int:
    with open(path, "rb") as f:
        np.lib.format.read_magic(f)
        shape, _, _ = np.lib.format.read_array_header_1_0(f)
    return int(shape[0])
