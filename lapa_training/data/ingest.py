"""Ingest: rosbags, folders of human videos and other datasets -> one dataset on disk (dataset.py).

    from lapa_training.data.ingest import IngestOptions, ingest
    report = ingest(["bags/", "videos/"], "runs/data/mix", IngestOptions(image_size=128))
    print(report.summary())

Inputs may be bag directories (with metadata.yaml), single-file bags (.mcap, .db3), folders searched
recursively for bags and videos, single video files, LeRobot v3 datasets (lerobot_reader.py), or
existing datasets (their episodes are copied: a merge). Bags under a
``.recording/`` staging directory, or whose episode.json says "status": "recording", are skipped
with a warning. A bad input (corrupt bag, missing topic, unreadable video, no instruction, ...)
stops the run with an IngestError naming it, and nothing is written; with skip_bad it is skipped
with a warning and listed in the report instead.
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from lapa_training.data import bag_format
from lapa_training.data.bag_reader import BAG_FILE_SUFFIXES, BagOptions, is_incomplete, read_bag
from lapa_training.data.dataset import Dataset, DatasetWriter, is_dataset, iter_chunks
from lapa_training.data.errors import IncompleteEpisode, IngestError
from lapa_training.data.lerobot_format import is_lerobot_dataset
from lapa_training.data.lerobot_reader import LeRobotOptions, read_lerobot
from lapa_training.data.video_reader import VIDEO_SUFFIXES, VideoOptions, caption_for, find_captions, \
    load_captions, read_video

__all__ = ["IngestError", "IngestOptions", "IngestReport", "Source", "discover_sources", "ingest"]

ROBOT_WINDOW_S = 0.6  # default LAQ window of robot data (6 frames at 10 Hz)
VIDEO_WINDOW_S = 2.4  # default LAQ window of human video


@dataclass
class IngestOptions:
    """Everything `lapa data ingest` can set. bag holds the bag-specific options (topics, rate, frames)."""

    image_size: int = 128  # square frame size; 0 keeps the source size (all sources must agree)
    frame_codec: str = "raw"  # new datasets: raw frames (format v1) or JPEG shards (format v2)
    bag: BagOptions = field(default_factory=BagOptions)
    window_s: float | None = None  # LAQ window [s]; None: 0.6 for bags, 2.4 for videos
    window_frames: int = 6  # stored frames per window, sets the video frame stride
    instructions_file: Path | None = None  # CSV/JSON name -> instruction, for bags and videos
    allow_empty_instruction: bool = False
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 0
    skip_bad: bool = False
    mode: str = "create"  # 'create', 'overwrite' or 'append'
    workers: int = 1  # processes that ingest groups of sources side by side
    action_key: str | None = None  # LeRobot inputs: the feature actions come from (None: action-free)
    action_convention: str = "delta_rpy"  # ... and how to read it (lerobot_reader.CONVENTIONS)
    progress: bool = True
    warn: Callable[[str], None] | None = None  # where warnings go (default: stderr)


@dataclass
class IngestReport:
    out: Path
    episodes_added: int = 0
    frames_added: int = 0
    episodes_with_actions: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of bad inputs skipped
    incomplete: list[str] = field(default_factory=list)  # episode bags still recording
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        parts = [f"{self.episodes_added} episodes ({self.episodes_with_actions} with actions), "
                 f"{self.frames_added} frames -> {self.out} in {self.seconds:.1f} s"]
        if self.skipped:
            parts.append(f"skipped {len(self.skipped)} bad input(s)")
        if self.incomplete:
            parts.append(f"skipped {len(self.incomplete)} incomplete recording(s)")
        return "; ".join(parts)


@dataclass
class Source:
    kind: str  # 'bag', 'video', 'dataset', 'lerobot' or 'incomplete'
    path: Path
    root: Path  # the input it was found under


# ---------------------------------------------------------------- discovery
def discover_sources(inputs: Iterable[str | Path], exclude: Path | None = None,
                     bad: list[tuple[str, str]] | None = None) -> list[Source]:
    """Every bag, video and dataset under the inputs, in a stable (sorted) order.

    A bad input (missing, of an unknown kind, a folder with nothing to ingest) raises an IngestError,
    or, when a list is given as bad, is appended to it as (path, reason) and skipped.
    """
    sources: list[Source] = []
    exclude = exclude.resolve() if exclude else None
    for raw in inputs:
        root = Path(raw)
        try:
            sources.extend(_sources_of(root, exclude))
        except IngestError as e:
            if bad is None:
                raise
            bad.append((str(root), str(e)))
    return sources


def _sources_of(root: Path, exclude: Path | None) -> list[Source]:
    if not root.exists():
        raise IngestError(f"{root}: no such file or directory")
    if root.is_file():
        if root.suffix.lower() in VIDEO_SUFFIXES:
            return [Source("video", root, root.parent)]
        if root.suffix in BAG_FILE_SUFFIXES:
            if (root.parent / "metadata.yaml").is_file():
                raise IngestError(f"{root}: give the bag directory (the one with metadata.yaml), not its storage file")
            return [Source("incomplete" if is_incomplete(root) else "bag", root, root.parent)]
        raise IngestError(f"{root}: not a bag (directory, .mcap or .db3), video ({', '.join(VIDEO_SUFFIXES)}) "
                          "or dataset")
    found = list(_walk(root, root, exclude))
    if not found:
        raise IngestError(f"{root}: no bags, videos or datasets found in it")
    return found


def _is_rosbag2_file(path: Path) -> bool:
    """A storage file named as rosbag2 names them in its bag directory (<name>_<n>.mcap); given alone, it is read."""
    stem, _, index = path.stem.rpartition("_")
    return bool(stem) and index.isdigit()


def _walk(folder: Path, root: Path, exclude: Path | None) -> Iterable[Source]:
    if exclude is not None and folder.resolve() == exclude:
        return
    if is_dataset(folder):
        yield Source("dataset", folder, root)
        return
    if is_lerobot_dataset(folder):
        yield Source("lerobot", folder, root)
        return
    try:
        entries = sorted(folder.iterdir())
    except OSError as e:
        raise IngestError(f"{folder}: cannot list the folder ({e.strerror})") from e
    storage_files = [p for p in entries if p.suffix in BAG_FILE_SUFFIXES and p.is_file()]
    if (folder / "metadata.yaml").is_file() or (storage_files and all(map(_is_rosbag2_file, storage_files))):
        yield Source("incomplete" if is_incomplete(folder) else "bag", folder, root)
        return
    for p in storage_files:  # single-file bags, as writers other than rosbag2 leave them
        yield Source("incomplete" if is_incomplete(p) else "bag", p, root)
    for p in entries:
        if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES and not p.name.startswith("."):
            yield Source("video", p, root)
    for p in entries:
        if p.is_dir() and (not p.name.startswith(".") or p.name == bag_format.STAGING_DIR):
            yield from _walk(p, root, exclude)


# ---------------------------------------------------------------- ingest
def ingest(inputs: Iterable[str | Path], out: str | Path, options: IngestOptions | None = None) -> IngestReport:
    """Ingest inputs into the dataset at out (see module docstring). Returns what was done.

    Raises IngestError for bad input (unless options.skip_bad) and when nothing could be ingested.
    With options.workers > 1 the sources are ingested in that many processes, in groups, each into
    a part dataset beside out; the parts are merged in source order (the same dataset as one
    process makes; JPEG shards are moved, not decoded) and the dataset appears at close, as always.
    """
    from tqdm import tqdm

    options = options or IngestOptions()
    out = Path(out)
    t_start = time.perf_counter()
    report = IngestReport(out=out)
    inputs = [Path(p) for p in inputs]
    if not inputs:
        raise IngestError("no inputs given")
    for p in inputs:
        if p.exists() and p.resolve() == out.resolve():
            raise IngestError(f"{p}: the output dataset cannot also be an input")

    def warn(message: str) -> None:
        report.warnings.append(message)
        if options.warn is not None:
            options.warn(message)
        else:
            tqdm.write(f"warning: {message}", file=sys.stderr)

    sources = discover_sources(inputs, exclude=out, bad=report.skipped if options.skip_bad else None)
    for path, reason in report.skipped:
        warn(f"skipping bad input: {reason}")
    instructions = load_captions(options.instructions_file) if options.instructions_file else None
    bag_options = _bag_options(options, instructions)
    cameras = [bag_options.image_topic, *bag_options.extra_image_topics] if bag_options.extra_image_topics else None
    if cameras and (not bag_options.image_topic or len(set(cameras)) != len(cameras)):
        raise IngestError(f"several cameras need distinct --image-topic names, the first one given too: {cameras}")
    writer = DatasetWriter(out, image_size=options.image_size, control_rate=bag_options.rate_hz, mode=options.mode,
                           split_fractions=options.split, seed=options.seed, cameras=cameras,
                           frame_codec=options.frame_codec,
                           run_info={"inputs": [str(p) for p in inputs], "options": _options_record(options)})
    parts: list[Path] = []
    try:
        if options.workers > 1 and len(sources) > 1:
            parts = _ingest_in_parallel(sources, writer, options, instructions, cameras, report, warn)
        else:
            bar = tqdm(sources, desc="ingesting", unit="src", disable=not options.progress, file=sys.stderr)
            _ingest_sources(bar, writer, options, instructions, cameras, report, warn)
        if report.episodes_added == 0:
            raise IngestError(f"nothing ingested from {', '.join(map(str, inputs))}: "
                              f"{len(report.skipped)} bad, {len(report.incomplete)} incomplete")
        writer.close({"skipped": report.skipped, "incomplete": report.incomplete})
    except BaseException:
        writer.abort()
        raise
    finally:
        for part in parts:
            shutil.rmtree(part, ignore_errors=True)
    if report.skipped:
        warn(f"skipped {len(report.skipped)} bad input(s): " + ", ".join(p for p, _ in report.skipped))
    report.seconds = time.perf_counter() - t_start
    return report


def _ingest_sources(sources: Iterable[Source], writer: DatasetWriter, options: IngestOptions,
                    instructions: dict[str, str] | None, cameras: list[str] | None, report: IngestReport,
                    warn: Callable[[str], None]) -> None:
    """Every source into writer, one after another; report says what was added and skipped."""
    bag_options = _bag_options(options, instructions)
    video_options = VideoOptions(window_s=options.window_s or VIDEO_WINDOW_S, window_frames=options.window_frames,
                                 instructions=instructions, allow_empty_instruction=options.allow_empty_instruction)
    captions_cache: dict[Path, dict[str, str]] = {}
    for src in sources:
        if src.kind == "incomplete":
            report.incomplete.append(str(src.path))
            warn(f"{src.path}: incomplete episode (still recording or interrupted); skipped")
            continue
        try:
            if src.kind == "dataset":
                records = _merge_dataset(src.path, writer)
            elif src.kind == "lerobot":
                records = read_lerobot(src.path, _lerobot_options(options), writer, warn)
            else:
                writer.begin_episode()
                if src.kind == "bag":
                    ep = read_bag(src.path, bag_options, writer)
                else:
                    if cameras:
                        raise IngestError(f"{src.path}: a video has one camera, and this ingest stores "
                                          f"{len(cameras)} ({', '.join(cameras)}); ingest videos separately")
                    caption = _video_caption(src, instructions, captions_cache)
                    ep = read_video(src.path, caption, video_options, writer)
                for message in ep.warnings:
                    warn(message)
                records = [writer.end_episode(ep.actions, ep.timestamps_s, ep.record())]
        except IncompleteEpisode as e:
            writer.abort_episode()
            report.incomplete.append(str(src.path))
            warn(str(e))
            continue
        except IngestError as e:
            writer.abort_episode()
            if not options.skip_bad:
                raise
            report.skipped.append((str(src.path), str(e)))
            warn(f"skipping bad input: {e}")
            continue
        report.episodes_added += len(records)
        report.frames_added += sum(r["length"] for r in records)
        report.episodes_with_actions += sum(bool(r["has_actions"]) for r in records)
        if hasattr(sources, "set_postfix"):
            sources.set_postfix(episodes=report.episodes_added, frames=report.frames_added, refresh=False)


def _ingest_in_parallel(sources: list[Source], writer: DatasetWriter, options: IngestOptions,
                        instructions: dict[str, str] | None, cameras: list[str] | None, report: IngestReport,
                        warn: Callable[[str], None]) -> list[Path]:
    """Groups of sources ingested by a pool into part datasets, merged into writer in order."""
    import multiprocessing

    from tqdm import tqdm

    from lapa_core.child_processes import pool_worker

    groups = max(1, min(len(sources), options.workers * 4))  # a few per worker: even loads, finer progress
    bounds = np.linspace(0, len(sources), groups + 1).astype(int)
    root = writer.root
    parts = [root.parent / f".{root.name}.part-{k:04d}" for k in range(groups)]
    for part in parts:
        shutil.rmtree(part, ignore_errors=True)
    part_options = replace(options, workers=1, mode="create", progress=False, warn=None)
    jobs = [(sources[a:b], part, part_options, instructions, cameras) for (a, b), part in
            zip(zip(bounds[:-1], bounds[1:]), parts) if b > a]
    bar = tqdm(total=len(sources), desc=f"ingesting ({options.workers} processes)", unit="src",
               disable=not options.progress, file=sys.stderr)
    # spawn: this process has threads (the frame encoder's), which a fork would copy half-way
    with multiprocessing.get_context("spawn").Pool(min(options.workers, len(jobs)), initializer=pool_worker) as pool:
        try:
            for (group, part, *_), done in zip(jobs, pool.imap(_ingest_part, jobs)):
                for message in done.warnings:
                    warn(message)
                report.skipped += done.skipped
                report.incomplete += done.incomplete
                if done.episodes_added:
                    records = writer.merge_part(part)
                    report.episodes_added += len(records)
                    report.frames_added += sum(r["length"] for r in records)
                    report.episodes_with_actions += sum(bool(r["has_actions"]) for r in records)
                shutil.rmtree(part, ignore_errors=True)
                bar.update(len(group))
                bar.set_postfix(episodes=report.episodes_added, frames=report.frames_added, refresh=False)
        finally:
            bar.close()
            pool.terminate()
    return parts


def _ingest_part(job) -> IngestReport:
    """In a pool worker: a group of sources into a part dataset of its own."""
    sources, part, options, instructions, cameras = job
    report = IngestReport(out=part)
    bag_options = _bag_options(options, instructions)
    writer = DatasetWriter(part, image_size=options.image_size, control_rate=bag_options.rate_hz, mode="create",
                           split_fractions=options.split, seed=options.seed, cameras=cameras,
                           frame_codec=options.frame_codec)
    try:
        _ingest_sources(sources, writer, options, instructions, cameras, report, report.warnings.append)
        if report.episodes_added:
            writer.close()
        else:
            writer.abort()
    except BaseException:
        writer.abort()
        raise
    return report


def _bag_options(options: IngestOptions, instructions: dict[str, str] | None) -> BagOptions:
    bag = options.bag
    return replace(bag, window_s=options.window_s or ROBOT_WINDOW_S,
                   instructions=instructions if instructions is not None else bag.instructions,
                   allow_empty_instruction=options.allow_empty_instruction or bag.allow_empty_instruction)


def _lerobot_options(options: IngestOptions) -> LeRobotOptions:
    bag = options.bag
    return LeRobotOptions(camera=bag.image_topic, extra_cameras=tuple(bag.extra_image_topics),
                          action_key=options.action_key,
                          action_convention=options.action_convention, gripper_open=bag.gripper_open,
                          gripper_closed=bag.gripper_closed, rate_hz=bag.rate_hz,
                          window_s=options.window_s or ROBOT_WINDOW_S,
                          allow_empty_instruction=options.allow_empty_instruction)


def _options_record(options: IngestOptions) -> dict[str, Any]:
    """The options as plain JSON for meta.json's ingest history."""
    rec = {k: getattr(options, k) for k in options.__dataclass_fields__
           if k not in ("warn", "bag", "progress", "workers")}
    rec["bag"] = {k: getattr(options.bag, k) for k in options.bag.__dataclass_fields__ if k != "instructions"}
    rec["bag"]["extra_image_topics"] = list(options.bag.extra_image_topics)
    rec["instructions_file"] = str(options.instructions_file) if options.instructions_file else None
    rec["split"] = list(options.split)
    return rec


def _video_caption(src: Source, instructions: dict[str, str] | None, cache: dict[Path, dict[str, str]]) -> str:
    """Caption from --instructions, else from the captions file of the video's folder or a parent up to its root."""
    if instructions is not None:
        return caption_for(src.path, src.root, instructions)
    folder = src.path.parent
    while True:
        if folder not in cache:
            found = find_captions(folder)
            cache[folder] = load_captions(found) if found else {}
        caption = caption_for(src.path, folder, cache[folder])
        if caption or folder == src.root or folder.parent == folder:
            return caption
        folder = folder.parent


def _merge_dataset(path: Path, writer: DatasetWriter) -> list[dict[str, Any]]:
    """Copy every episode of the dataset at path (frames in chunks, never all in memory)."""
    src = Dataset(path)
    if src.cameras != writer.cameras:
        raise IngestError(f"{path}: its cameras ({', '.join(src.cameras) or 'one'}) are not this dataset's "
                          f"({', '.join(writer.cameras) or 'one'}); merge needs the same cameras")
    others = {name: Dataset(path, camera=name).frames for name in src.cameras[1:]}
    shape = tuple(src.frames.shape[1:])
    if writer.frame_shape is not None and shape != tuple(writer.frame_shape):
        raise IngestError(f"{path}: dataset frames are {shape[1]}x{shape[0]}, this dataset's are "
                          f"{writer.frame_shape[1]}x{writer.frame_shape[0]}; merge needs the same --image-size")
    records = []
    for e in src.episodes:
        writer.begin_episode()
        sl = src.episode_slice(e["index"])
        for chunk in iter_chunks(sl.stop - sl.start, 256):
            rows = slice(sl.start + chunk.start, sl.start + chunk.stop)
            writer.add_frames(np.asarray(src.frames[rows]))
            for name, frames in others.items():
                writer.add_frames(np.asarray(frames[rows]), camera=name)
        record = {k: v for k, v in e.items() if k not in ("index", "start", "length")}
        record["provenance"] = {**e.get("provenance", {}), "merged_from": str(path.resolve())}
        records.append(writer.end_episode(np.asarray(src.actions[sl]), np.asarray(src.timestamps[sl]), record))
    return records

