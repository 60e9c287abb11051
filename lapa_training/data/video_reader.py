"""Action-free episodes from video files (mp4, webm, avi, ... anything cv2.VideoCapture opens) and captions.

One video = one episode. Frames are subsampled by an integer stride chosen so that the LAQ window
(window_s seconds, 2.4 s by default for human video) spans window_frames stored frames:

    stride = max(1, round(native_fps * window_s / window_frames)),  stored fps = native_fps / stride

e.g. 30 fps video, 2.4 s, 6 frames -> stride 12, 2.5 stored frames/s. Each episode records its
stored fps and window_frames (the trainer's H).

Captions (the instruction of each video) come from a CSV with a header (a name column: video,
file, path, name, id; an instruction column: instruction, label, caption, text, template) or a
JSON file: an object {name: instruction} or a list of records like Something-Something-v2's
[{"id": "123", "label": "...", "template": "...", "placeholders": [...]}] (video 123.webm).
A video matches a caption by relative path, file name or file stem.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from lapa_training.data import bag_format
from lapa_training.data.bag_reader import FrameSink
from lapa_training.data.errors import IngestError

VIDEO_SUFFIXES = (".mp4", ".webm", ".avi", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg")
CAPTION_FILENAMES = ("captions.csv", "captions.json", "labels.csv", "labels.json", "instructions.csv",
                     "instructions.json")
NAME_COLUMNS = ("video", "file", "filename", "path", "name", "id", "bag", "episode")
TEXT_COLUMNS = ("instruction", "label", "caption", "text", "description", "template")


@dataclass
class VideoOptions:
    window_s: float = 2.4  # LAQ window for human video [s]
    window_frames: int = 6  # stored frames the window spans
    instructions: Mapping[str, str] | None = None  # name -> instruction (--instructions); else a captions file
    allow_empty_instruction: bool = False


@dataclass
class VideoEpisode:
    path: Path
    num_frames: int  # stored
    native_fps: float
    stride: int
    instruction: str
    window_frames: int
    provenance: dict[str, Any]
    warnings: list[str] = field(default_factory=list)

    @property
    def fps(self) -> float:
        return self.native_fps / self.stride

    @property
    def timestamps_s(self) -> np.ndarray:
        return np.arange(self.num_frames) * (self.stride / self.native_fps)

    @property
    def actions(self) -> np.ndarray:
        return np.full((self.num_frames, bag_format.ACTION_DIM), np.nan, dtype=np.float32)

    def record(self) -> dict[str, Any]:
        return {"name": self.path.stem, "instruction": self.instruction, "has_actions": False, "success": None,
                "task": None, "fps": self.fps, "window_frames": self.window_frames, "provenance": self.provenance}


# ---------------------------------------------------------------- captions
def load_captions(path: str | Path) -> dict[str, str]:
    """name -> instruction from a captions CSV or JSON (see module docstring)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise IngestError(f"{path}: cannot read captions ({e.strerror})") from e
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except ValueError as e:
            raise IngestError(f"{path}: not valid JSON ({e})") from e
        if isinstance(data, dict):
            return {str(k): str(v) for k, v in data.items() if isinstance(v, (str, int, float))}
        if isinstance(data, list):
            out = {}
            for item in data:
                if not isinstance(item, dict):
                    raise IngestError(f"{path}: expected a list of objects with an id and a label")
                name = next((item[c] for c in NAME_COLUMNS if c in item), None)
                if name is None:
                    raise IngestError(f"{path}: a record has none of the keys {', '.join(NAME_COLUMNS)}")
                out[str(name)] = _json_caption(item)
            return out
        raise IngestError(f"{path}: expected a JSON object or list")
    rows = list(csv.reader(text.splitlines()))
    if not rows:
        raise IngestError(f"{path}: empty captions file")
    header = [h.strip().lower() for h in rows[0]]
    name_col = next((header.index(c) for c in NAME_COLUMNS if c in header), None)
    text_col = next((header.index(c) for c in TEXT_COLUMNS if c in header), None)
    if name_col is None or text_col is None:
        raise IngestError(f"{path}: the header needs a name column ({', '.join(NAME_COLUMNS)}) and an instruction "
                          f"column ({', '.join(TEXT_COLUMNS)}); found {', '.join(header)}")
    return {row[name_col].strip(): row[text_col].strip() for row in rows[1:]
            if len(row) > max(name_col, text_col) and row[name_col].strip()}


def _json_caption(item: Mapping[str, Any]) -> str:
    """SSv2 records: the filled-in label, else the template with its [placeholders] filled or unbracketed."""
    for key in ("instruction", "label", "caption", "text"):
        if isinstance(item.get(key), str) and item[key].strip():
            return item[key].strip()
    template = item.get("template")
    if isinstance(template, str):
        fills = iter(item.get("placeholders") or [])
        return re.sub(r"\[([^\]]*)\]", lambda m: str(next(fills, m.group(1))), template).strip()
    return ""


def find_captions(folder: Path) -> Path | None:
    """The captions file of a video folder: a known name, else the folder's only .csv/.json file."""
    for name in CAPTION_FILENAMES:
        if (folder / name).is_file():
            return folder / name
    candidates = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in (".csv", ".json")]
    return candidates[0] if len(candidates) == 1 else None


def caption_for(video: Path, root: Path, captions: Mapping[str, str]) -> str:
    """The caption of video: looked up by path relative to root, file name, then stem."""
    keys = [video.name, video.stem]
    try:
        keys.insert(0, video.relative_to(root).as_posix())
    except ValueError:
        pass
    for key in keys:
        if key in captions and captions[key].strip():
            return captions[key].strip()
    return ""


# ---------------------------------------------------------------- frames
def choose_stride(native_fps: float, window_s: float, window_frames: int) -> int:
    """Integer frame stride so that window_frames stored frames span about window_s seconds."""
    if window_frames <= 0 or window_s <= 0:
        raise IngestError(f"bad window: {window_frames} frames over {window_s} s")
    return max(1, int(round(native_fps * window_s / window_frames)))


def read_video(path: str | Path, instruction: str, options: VideoOptions, sink: FrameSink) -> VideoEpisode:
    """Decode every stride-th frame of the video into sink (as RGB); returns the episode description."""
    import cv2

    path = Path(path)
    if not instruction and not options.allow_empty_instruction:
        raise IngestError(f"{path}: empty instruction (no caption for this video in the captions file "
                          "or --instructions)")
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise IngestError(f"{path}: unreadable video (cv2.VideoCapture cannot open it)")
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        if not np.isfinite(fps) or fps <= 0 or fps > 1000:
            raise IngestError(f"{path}: video reports no valid frame rate ({fps})")
        stride = choose_stride(fps, options.window_s, options.window_frames)
        stored, index, size = 0, 0, None
        while True:
            if index % stride == 0:
                ok, bgr = cap.read()
                if not ok:
                    break
                if size is None:
                    size = [int(bgr.shape[1]), int(bgr.shape[0])]
                sink.add_frame(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
                stored += 1
            elif not cap.grab():
                break
            index += 1
    finally:
        cap.release()
    if stored == 0:
        raise IngestError(f"{path}: unreadable video (no frame could be decoded)")
    provenance = {"kind": "video", "source": str(path.resolve()), "storage": path.suffix.lstrip(".").lower(),
                  "encoding": "video", "native_size": size, "native_fps": fps, "stride": stride,
                  "num_source_frames": index, "window_s": options.window_frames * stride / fps}
    return VideoEpisode(path=path, num_frames=stored, native_fps=fps, stride=stride, instruction=instruction,
                        window_frames=options.window_frames, provenance=provenance)
