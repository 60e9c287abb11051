"""A .npy file that grows along its first axis, written in batches: the frames, actions and
timestamps of a dataset being written (dataset.py), and a JPEG store's index (frame_shards.py).

The header is a fixed NPY_HEADER_BYTES, so rows are appended without moving anything and the row
count is rewritten at flush; np.load(..., mmap_mode="r") reads the file as a standard .npy.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from lapa_training.data.errors import IngestError

NPY_HEADER_BYTES = 128


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """A version-1.0 .npy header padded to exactly NPY_HEADER_BYTES (numpy accepts any space padding)."""
    text = repr({"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape})
    body_len = NPY_HEADER_BYTES - 10
    if len(text) + 1 > body_len:
        raise ValueError(f"npy header too long for shape {shape}")
    return b"\x93NUMPY\x01\x00" + body_len.to_bytes(2, "little") + (text.ljust(body_len - 1) + "\n").encode("latin1")


def write_all(fd: int, buffers: list, path: Path) -> None:
    """writev() all of buffers at the file position (retrying after a partial write)."""
    views = [memoryview(b).cast("B") for b in buffers]
    try:
        while views:
            written = os.writev(fd, views[:1024])
            while views and written >= len(views[0]):
                written -= len(views[0])
                views.pop(0)
            if views and written:
                views[0] = views[0][written:]
    except OSError as e:
        raise IngestError(f"{path}: cannot write ({e})") from e


class GrowableArrayFile:
    """A .npy file that grows along its first axis; the row count in the header is written by flush().

    Opening an existing file truncates it to the rows its header declares, so rows appended by a
    writer that crashed before flushing are dropped. With batch_bytes > 0, single rows are queued
    and written about batch_bytes at a time with one writev() (a third faster than a write per
    image; much larger batches are slower again); queued arrays must not be modified afterwards.
    """

    def __init__(self, path: Path, dtype: np.dtype | str, row_shape: tuple[int, ...] | None,
                 batch_bytes: int = 0):
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.batch_bytes = batch_bytes
        self._pending: list[memoryview] = []
        self._pending_bytes = 0
        if self.path.exists():
            with open(self.path, "rb") as f:
                try:
                    version = np.lib.format.read_magic(f)
                    shape, fortran, file_dtype = np.lib.format.read_array_header_1_0(f)
                except ValueError as e:
                    raise IngestError(f"{self.path}: not a .npy file this writer made ({e})") from e
                offset = f.tell()
            if version != (1, 0) or offset != NPY_HEADER_BYTES or fortran or file_dtype != self.dtype or (
                    row_shape is not None and tuple(shape[1:]) != tuple(row_shape)):
                raise IngestError(f"{self.path}: not a growable {self.dtype} array with rows {row_shape} "
                                  f"(found {file_dtype} {shape})")
            self.row_shape = tuple(shape[1:])
            self.rows = int(shape[0])
            self._file = open(self.path, "r+b", buffering=0)
            self._file.truncate(NPY_HEADER_BYTES + self.rows * self.row_bytes)
            self._file.seek(0, os.SEEK_END)
        else:
            self.row_shape = tuple(row_shape) if row_shape is not None else None
            self.rows = 0
            self._file = open(self.path, "w+b", buffering=0)
            self._write([memoryview(b"\0" * NPY_HEADER_BYTES)])  # real header written by flush()

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize

    def append(self, rows: np.ndarray) -> None:
        """Append rows (n, *row_shape) (or one row of row_shape when row_shape is known)."""
        if type(rows) is np.ndarray and rows.shape == self.row_shape and rows.dtype == self.dtype \
                and rows.flags.c_contiguous:  # fast path: one row, as it comes from a decoder
            self.rows += 1
            if self.batch_bytes:
                self._pending.append(rows.data)
                self._pending_bytes += rows.nbytes
                if self._pending_bytes >= self.batch_bytes:
                    self._write_pending()
            else:
                self._write([rows.data])
            return
        rows = np.asarray(rows, dtype=self.dtype)
        if self.row_shape is None:
            self.row_shape = tuple(rows.shape[1:])
        if rows.shape == self.row_shape:
            rows = rows[None]
        if rows.shape[1:] != self.row_shape:
            raise ValueError(f"{self.path.name}: rows of shape {rows.shape[1:]}, expected {self.row_shape}")
        self._write_pending()
        self._write([np.ascontiguousarray(rows).data])
        self.rows += len(rows)

    def _write_pending(self) -> None:
        if self._pending:
            pending, self._pending, self._pending_bytes = self._pending, [], 0
            self._write(pending)

    def _write(self, buffers: list[memoryview]) -> None:
        write_all(self._file.fileno(), buffers, self.path)

    def truncate(self, rows: int) -> None:
        """Drop every row from index rows on (used to undo a failed episode)."""
        self._write_pending()
        if self.row_shape is None:  # no row written yet (e.g. --image-size 0 and the first source failed)
            return
        self._file.truncate(NPY_HEADER_BYTES + rows * self.row_bytes)
        self._file.seek(0, os.SEEK_END)
        self.rows = rows

    def flush(self) -> None:
        """Write what is queued, then the header with the current row count."""
        self._write_pending()
        self._file.seek(0)
        self._write([memoryview(_npy_header(self.dtype, (self.rows, *(self.row_shape or ()))))])
        self._file.seek(0, os.SEEK_END)

    def close(self, write_header: bool = True) -> None:
        try:
            if write_header:
                self.flush()
        finally:
            self._pending, self._pending_bytes = [], 0
            self._file.close()
