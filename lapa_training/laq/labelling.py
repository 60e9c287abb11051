"""Latent-action labels: a trained LAQ encoder turns every frame pair (x_t, x_{t+H}) of a dataset
into L token ids, the targets of latent pretraining (stage 2 of LAPA).

Labels live beside the dataset they describe, one folder per labelling:

    <dataset>/labels/<name>/tokens.npy   int16 (N, L): row i = tokens of the pair (i, i + H), H the
                                         episode's window; -1 where frame i has no partner (the last
                                         H frames of every episode)
    <dataset>/labels/<name>/labels.json  what made them: LAQ checkpoint, config, windows, counts

They are written to a temporary folder and renamed into place, so a crash never leaves half a
labelling under the name. `read_labels` refuses labels that do not fit the dataset any more (an
`--append` ingest after labelling).

At scale: the pairs are cut into chunks of CHUNK_BATCHES batches, and each chunk's tokens are saved
in <dataset>/labels/.<name>.parts/ as soon as they are done, so a labelling that was killed resumes
where it stopped. Under `torchrun` or `accelerate launch` (RANK, WORLD_SIZE) process r labels chunks
r, r + N, ...; when every chunk is done, process 0 merges them into the labels folder and removes the
parts. Chunks and batches are cut the same whatever N is, so N processes give one process's labels.
"""

from __future__ import annotations

import json
import queue
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lapa_training.data.dataset import Dataset
from lapa_training.laq.modeling_laq import LAQModel, frames_to_input

LABELS_DIR = "labels"
TOKENS_FILE = "tokens.npy"
LABELS_JSON = "labels.json"
FORMAT = "lapa-latent-labels"
VERSION = 1
NO_LABEL = -1
CHUNK_BATCHES = 32  # batches per saved chunk: what a killed labelling loses at most
PLAN_JSON = "plan.json"
EPISODE_FIELDS = ("index", "start", "length", "window_frames", "split", "has_actions")  # what labelling reads


class LabelError(ValueError):
    """Labels are missing, stale, or cannot be made as asked; the message says what to do."""


@dataclass
class LatentLabels:
    tokens: np.ndarray  # (N, L) int16, NO_LABEL where frame i starts no pair
    meta: dict[str, Any]

    @property
    def num_tokens(self) -> int:
        return int(self.meta["num_tokens"])

    @property
    def codebook_size(self) -> int:
        return int(self.meta["codebook_size"])

    def labelled(self) -> np.ndarray:
        """Indices of the frames that have tokens."""
        return np.nonzero(self.tokens[:, 0] != NO_LABEL)[0]


def labels_path(dataset_root: str | Path, name: str) -> Path:
    return Path(dataset_root) / LABELS_DIR / name


def window_per_frame(ds: Dataset, window_frames: int | None) -> np.ndarray:
    """H for every frame (its episode's window, or the override)."""
    h = np.zeros(len(ds), dtype=np.int64)
    for e in ds.episodes:
        h[e["start"]:e["start"] + e["length"]] = int(window_frames or e["window_frames"])
    return h


def label_pairs(ds: Dataset, window_frames: int | None = None) -> np.ndarray:
    """All (i, i + H) pairs of every split, sorted by i: what a labelling covers."""
    return ds.pairs(None, window_frames)


def _blocks(ds: Dataset, pairs: np.ndarray, batch_size: int):
    """Yield (pair rows, x_t uint8, x_next uint8) batches, reading one contiguous frame range per
    batch (x_t and x_{t+H} of neighbouring pairs overlap, so each frame is read once)."""
    for start in range(0, len(pairs), batch_size):
        rows = pairs[start:start + batch_size]
        lo, hi = int(rows[:, 0].min()), int(rows[:, 1].max()) + 1
        block = np.asarray(ds.frames[lo:hi])
        yield rows, torch.from_numpy(block[rows[:, 0] - lo]), torch.from_numpy(block[rows[:, 1] - lo])


def _prefetched(iterable, depth: int = 2):
    """Run a generator one or two items ahead in a thread (disk reads overlap the model)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    error: list[BaseException] = []

    def work():
        try:
            for item in iterable:
                q.put(item)
        except BaseException as e:  # handed to the consumer
            error.append(e)
        finally:
            q.put(done)

    threading.Thread(target=work, daemon=True).start()
    while True:
        item = q.get()
        if item is done:
            if error:
                raise error[0]
            return
        yield item


@torch.no_grad()
def encode_pairs(model: LAQModel, ds: Dataset, pairs: np.ndarray, *, batch_size: int = 256,
                 device: str | torch.device = "cpu", progress: bool = True, bar=None) -> np.ndarray:
    """Tokens (M, L) int64 of the given pairs (i, j) of ds, in order (bar: a tqdm bar to advance)."""
    from tqdm import tqdm

    model.eval()
    size = model.config.image_size
    out = np.empty((len(pairs), model.config.num_tokens), dtype=np.int64)
    done = 0
    own = bar is None
    bar = bar or tqdm(total=len(pairs), desc="labelling", unit="pair", disable=not progress, dynamic_ncols=True)
    try:
        for rows, x_t, x_next in _prefetched(_blocks(ds, pairs, batch_size)):
            tokens = model.encode(frames_to_input(x_t, device, size), frames_to_input(x_next, device, size))
            out[done:done + len(rows)] = tokens.cpu().numpy()
            done += len(rows)
            bar.update(len(rows))
    finally:
        if own:
            bar.close()
    return out


def process_group() -> tuple[int, int]:
    """(rank, number of processes) as torchrun and accelerate launch give them; (0, 1) when run alone.
    Several processes meet in a gloo process group (it works on CPUs and beside CUDA)."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    rank = int(os.environ.get("RANK", "0") or 0)
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
    return rank, world


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _save_atomically(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    tmp.replace(path)


def label_dataset(model: LAQModel, dataset_root: str | Path, *, name: str = "laq", window_frames: int | None = None,
                  batch_size: int = 256, device: str | torch.device = "cpu", overwrite: bool = False,
                  source: str | None = None, progress: bool = True, camera: str | None = None,
                  on_chunk=None) -> Path:
    """Label every pair of the dataset (of its camera `camera`, None: the first); returns the labels folder.
    on_chunk(c) is called after chunk c is saved (tests stop a labelling there)."""
    ds = Dataset(dataset_root, camera=camera, fields=EPISODE_FIELDS)
    if not name or "/" in name or name.startswith("."):
        raise LabelError(f"bad labels name {name!r}: use a plain folder name such as 'laq'")
    target = labels_path(ds.root, name)
    if target.exists() and not overwrite:
        raise LabelError(f"{target} exists; pass --overwrite to replace it or --name to label under another name")
    if ds.frames.shape[1:3] != tuple(model.config.image_size) and progress:
        print(f"note: frames are {ds.frames.shape[1]}x{ds.frames.shape[2]}, the LAQ model reads "
              f"{model.config.image_size[0]}x{model.config.image_size[1]}: resizing (area), as in training")
    pairs = label_pairs(ds, window_frames)
    if len(pairs) == 0:
        raise LabelError(f"{ds.root} has no frame pairs: every episode is shorter than its window + 1 frames")
    rank, world = process_group()
    chunk = batch_size * CHUNK_BATCHES
    chunks = -(-len(pairs) // chunk)
    parts = target.parent / f".{name}.parts"
    plan = {"laq_checkpoint": source, "laq_config": model.config.to_dict(), "window_frames": window_frames,
            "num_frames": len(ds), "num_episodes": ds.num_episodes, "pairs": int(len(pairs)), "chunk_pairs": chunk,
            "camera": ds.camera}
    if rank == 0:
        _start_parts(parts, plan, progress)
    _barrier(world)
    mine = [c for c in range(rank, chunks, world) if not (parts / f"chunk-{c:06d}.npy").is_file()]
    t0 = time.perf_counter()
    from tqdm import tqdm

    total = sum(len(pairs[c * chunk:(c + 1) * chunk]) for c in mine)
    with tqdm(total=total, desc="labelling" + (f" [{rank}/{world}]" if world > 1 else ""), unit="pair",
              disable=not progress, dynamic_ncols=True) as bar:
        model = model.to(device)
        for c in mine:
            tokens = encode_pairs(model, ds, pairs[c * chunk:(c + 1) * chunk], batch_size=batch_size, device=device,
                                  bar=bar)
            _save_atomically(parts / f"chunk-{c:06d}.npy", tokens.astype(np.int16))
            if on_chunk is not None:
                on_chunk(c)
    seconds = time.perf_counter() - t0
    _barrier(world)
    if rank == 0:
        _merge_parts(parts, target, name, pairs, chunk, chunks, model, ds, window_frames, source, seconds, world)
    _barrier(world)
    return target


def _start_parts(parts: Path, plan: dict, progress: bool) -> None:
    """The chunks folder of this labelling: kept when it belongs to the same labelling (a resume),
    else started afresh."""
    if (parts / PLAN_JSON).is_file():
        try:
            same = json.loads((parts / PLAN_JSON).read_text()) == json.loads(json.dumps(plan))
        except ValueError:
            same = False
        if same:
            done = len(list(parts.glob("chunk-*.npy")))
            if progress and done:
                print(f"resuming: {done} chunk(s) of an interrupted labelling are done")
            return
        shutil.rmtree(parts)
    shutil.rmtree(parts, ignore_errors=True)
    parts.mkdir(parents=True)
    (parts / PLAN_JSON).write_text(json.dumps(plan, indent=2) + "\n")


def _merge_parts(parts: Path, target: Path, name: str, pairs: np.ndarray, chunk: int, chunks: int, model: LAQModel,
                 ds: Dataset, window_frames: int | None, source: str | None, seconds: float, world: int) -> None:
    table = np.full((len(ds), model.config.num_tokens), NO_LABEL, dtype=np.int16)
    for c in range(chunks):
        path = parts / f"chunk-{c:06d}.npy"
        if not path.is_file():
            raise LabelError(f"{path} is missing: a labelling process stopped early; run the same command again "
                             f"to finish (done chunks are kept)")
        table[pairs[c * chunk:(c + 1) * chunk, 0]] = np.load(path)
    meta = {
        "format": FORMAT, "version": VERSION, "laq_checkpoint": source, "laq_config": model.config.to_dict(),
        "num_tokens": model.config.num_tokens, "codebook_size": model.config.codebook_size,
        "window_frames": window_frames, "windows": sorted({int(h) for h in window_per_frame(ds, window_frames)}),
        "num_frames": len(ds), "num_episodes": ds.num_episodes, "pairs_labelled": int(len(pairs)),
        "camera": ds.camera, "processes": world,
        "seconds": round(seconds, 3), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=target.parent))
    try:
        np.save(tmp / TOKENS_FILE, table)
        (tmp / LABELS_JSON).write_text(json.dumps(meta, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(parts, ignore_errors=True)


def read_labels(dataset_root: str | Path, name: str = "laq", dataset: Dataset | None = None) -> LatentLabels:
    """Labels of a dataset, checked against it."""
    target = labels_path(dataset_root, name)
    if not (target / LABELS_JSON).is_file():
        have = sorted(p.name for p in (Path(dataset_root) / LABELS_DIR).glob("*") if (p / LABELS_JSON).is_file()) \
            if (Path(dataset_root) / LABELS_DIR).is_dir() else []
        hint = f" (it has: {', '.join(have)})" if have else ""
        raise LabelError(f"{dataset_root} has no latent labels named {name!r}{hint}; make them with "
                         f"`lapa label --laq <LAQ run> --data {dataset_root}`")
    meta = json.loads((target / LABELS_JSON).read_text())
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise LabelError(f"{target} is not a lapa latent labelling of version {VERSION}")
    tokens = np.load(target / TOKENS_FILE, mmap_mode="r")
    ds = dataset or Dataset(dataset_root)
    if len(tokens) != len(ds) or meta.get("num_episodes") != ds.num_episodes:
        raise LabelError(f"labels {target} cover {len(tokens)} frames of {meta.get('num_episodes')} episodes but the "
                         f"dataset now has {len(ds)} frames of {ds.num_episodes}; label it again (--overwrite)")
    if tokens.ndim != 2 or tokens.shape[1] != meta["num_tokens"]:
        raise LabelError(f"{target}/{TOKENS_FILE} has shape {tokens.shape}, expected (N, {meta['num_tokens']})")
    return LatentLabels(tokens=tokens, meta=meta)
