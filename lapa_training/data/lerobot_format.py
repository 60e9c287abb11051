"""The LeRobot dataset format v3.0, as the lerobot library writes it (what `lapa data ingest` reads
and `lapa data export --format lerobot` writes; no dependency on the lerobot package):

    meta/info.json                                   codebase_version "v3.0", fps, features, path templates
    meta/stats.json                                  per feature: min max mean std count q01 q10 q50 q90 q99
    meta/tasks.parquet                               task_index, indexed by the task string (pandas index)
    meta/episodes/chunk-000/file-000.parquet         one row per episode: length, tasks, where its rows and
                                                     video frames are (file indices, from/to timestamps)
    data/chunk-000/file-000.parquet                  one row per frame, many episodes per file
    videos/<video key>/chunk-000/file-000.mp4        one stream per camera, many episodes per file

A frame of episode e lives in that episode's video file at from_timestamp + timestamp. Up to
chunks_size files per chunk folder; a file holds whole episodes. Parquet and video are read and
written with pyarrow and PyAV (AV1 through dav1d/SVT-AV1, H.264 through libx264).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from lapa_training.data.errors import IngestError

CODEBASE_VERSION = "v3.0"
INFO_JSON = "meta/info.json"
STATS_JSON = "meta/stats.json"
TASKS_PARQUET = "meta/tasks.parquet"
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
EPISODES_PATH = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
CHUNKS_SIZE = 1000  # files per chunk folder
DATA_FILE_SIZE_MB = 100
VIDEO_FILE_SIZE_MB = 200
QUANTILES = (0.01, 0.10, 0.50, 0.90, 0.99)
IMAGE_PREFIX = "observation.images."
# every frame's bookkeeping, as lerobot's DEFAULT_FEATURES
DEFAULT_FEATURES = {
    "timestamp": {"dtype": "float32", "shape": [1], "names": None},
    "frame_index": {"dtype": "int64", "shape": [1], "names": None},
    "episode_index": {"dtype": "int64", "shape": [1], "names": None},
    "index": {"dtype": "int64", "shape": [1], "names": None},
    "task_index": {"dtype": "int64", "shape": [1], "names": None},
}


def is_lerobot_dataset(path: Path) -> bool:
    return (path / INFO_JSON).is_file() and (path / "meta").is_dir()


def read_info(root: Path) -> dict[str, Any]:
    """meta/info.json of a v3 dataset; an IngestError for another version or a broken file."""
    try:
        info = json.loads((root / INFO_JSON).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IngestError(f"{root}: cannot read {INFO_JSON} ({type(e).__name__}: {e})") from None
    if not isinstance(info, dict) or not isinstance(info.get("features"), dict):
        raise IngestError(f"{root}: {INFO_JSON} has no 'features'")
    version = str(info.get("codebase_version", ""))
    if not version.startswith("v3."):
        raise IngestError(f"{root}: a LeRobot dataset of codebase_version {version or '?'}; only v3.x is read "
                          f"(convert it with lerobot's convert_dataset_v21_to_v30 first)")
    fps = info.get("fps")
    if not isinstance(fps, (int, float)) or not fps > 0:
        raise IngestError(f"{root}: {INFO_JSON} has no valid fps ({fps!r})")
    return info


def camera_keys(info: dict[str, Any]) -> list[str]:
    """Features that are camera streams (stored as video, or as images inside the data parquet)."""
    return [k for k, f in info["features"].items() if isinstance(f, dict) and f.get("dtype") in ("video", "image")]


def camera_key(name: str) -> str:
    """A lapa camera name (a topic such as /wrist/image_raw) as a LeRobot feature key (no '/')."""
    cleaned = "_".join(part for part in name.replace(".", "_").split("/") if part) or "camera"
    return IMAGE_PREFIX + cleaned


def read_tasks(root: Path) -> dict[int, str]:
    """task_index -> task, from meta/tasks.parquet whose task strings are its pandas index (a column
    'task', or '__index_level_0__' in files written before lerobot named the index)."""
    import pyarrow.parquet as pq

    path = root / TASKS_PARQUET
    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as e:
        raise IngestError(f"{root}: cannot read {TASKS_PARQUET} ({e})") from None
    names = table.column_names
    text = next((c for c in ("task", "__index_level_0__") if c in names), None)
    if text is None or "task_index" not in names:
        raise IngestError(f"{path}: expected columns task_index and task (the pandas index), found {names}")
    return {int(i): str(t) for i, t in zip(table.column("task_index").to_pylist(), table.column(text).to_pylist())}


def write_tasks(root: Path, tasks: list[str]) -> None:
    """meta/tasks.parquet as pandas writes DataFrame({'task_index': ...}, index=Index(tasks, name='task'))."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"task_index": pa.array(range(len(tasks)), pa.int64()), "task": pa.array(tasks, pa.string())})
    pandas_meta = {
        "index_columns": ["task"],
        "column_indexes": [{"name": None, "field_name": None, "pandas_type": "unicode", "numpy_type": "object",
                            "metadata": {"encoding": "UTF-8"}}],
        "columns": [{"name": "task_index", "field_name": "task_index", "pandas_type": "int64", "numpy_type": "int64",
                     "metadata": None},
                    {"name": "task", "field_name": "task", "pandas_type": "unicode", "numpy_type": "object",
                     "metadata": None}],
        "creator": {"library": "pyarrow", "version": pa.__version__}, "pandas_version": "2.2.3"}
    table = table.replace_schema_metadata({b"pandas": json.dumps(pandas_meta).encode()})
    path = root / TASKS_PARQUET
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def read_episodes(root: Path) -> list[dict[str, Any]]:
    """Every row of meta/episodes/*/*.parquet (without the per-episode stats), by episode_index."""
    import pyarrow.parquet as pq

    files = sorted((root / "meta" / "episodes").glob("chunk-*/file-*.parquet"))
    if not files:
        raise IngestError(f"{root}: no episode metadata (meta/episodes/chunk-*/file-*.parquet)")
    rows = []
    for f in files:
        try:
            table = pq.read_table(f)
        except (OSError, ValueError) as e:
            raise IngestError(f"{f}: cannot read ({e})") from None
        keep = [c for c in table.column_names if not c.startswith("stats/")]
        rows += table.select(keep).to_pylist()
    for row in rows:
        for key in ("episode_index", "length"):
            if not isinstance(row.get(key), int):
                raise IngestError(f"{root}: an episode row has no integer {key!r}")
    return sorted(rows, key=lambda r: r["episode_index"])


def feature_stats(values: np.ndarray, axis: tuple[int, ...] = (0,)) -> dict[str, list]:
    """lerobot's statistics of one feature over `axis` (NaN ignored): min max mean std count and quantiles."""
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    count = int(finite.all(axis=tuple(range(1, values.ndim))).sum()) if values.ndim > 1 else int(finite.sum())
    if not finite.any():
        return {}
    with np.errstate(all="ignore"):
        out = {"min": np.nanmin(values, axis=axis), "max": np.nanmax(values, axis=axis),
               "mean": np.nanmean(values, axis=axis), "std": np.nanstd(values, axis=axis)}
        for q in QUANTILES:
            out[f"q{int(round(q * 100)):02d}"] = np.nanquantile(values, q, axis=axis)
    stats = {k: np.atleast_1d(v).tolist() for k, v in out.items()}
    stats["count"] = [count]
    return stats


def image_stats(frames: np.ndarray) -> dict[str, list]:
    """Per-channel statistics of uint8 (n, H, W, 3) frames in [0, 1], each of shape (3, 1, 1) as lerobot's."""
    x = np.asarray(frames, dtype=np.float64) / 255.0
    chw = np.moveaxis(x, -1, 1)  # (n, 3, H, W)
    stats = feature_stats(chw, axis=(0, 2, 3))
    count = stats.pop("count")
    return {**{k: [[[c]] for c in v] for k, v in stats.items()}, "count": count}
