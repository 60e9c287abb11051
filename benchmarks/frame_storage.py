"""Frame storage of datasets: raw frames (format v1) against JPEG shards (format v2) and, as the other
candidate, video chunks as LeRobot stores them (AV1, a key frame every 2 frames).

    .venv/bin/python benchmarks/frame_storage.py [--episodes 4] [--train-steps 60] [--repeats 2]

On simulator episodes (reach, push, pick_place) rendered at 256 px and ingested at 128 and 256 px:
  disk          bytes per frame of each storage, and the ratio raw / it
  random read   ms to read one frame at a random index (memmap copy; JPEG decode; video seek+decode)
  PSNR          of what comes back against the raw frames
  training      samples/s of `lapa train laq` and `lapa train pretrain --objective action` on the tiny
                presets (config/train/*_tiny.yaml; the trainer reads batches in its own process), on
                the 128 px v1 and v2 datasets, runs alternating, best of --repeats; ratio v2 / v1
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LAPA = [sys.executable, "-m", "lapa_cli.main"]


def run(args: list[str]) -> None:
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stderr[-2000:]}")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = ((np.asarray(a, float) - np.asarray(b, float)) ** 2).reshape(len(a), -1).mean(axis=1)
    return float((10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-12))).min())


def random_read_ms(frames, n: int = 300) -> float:
    idx = np.random.default_rng(0).integers(0, len(frames), n)
    t0 = time.perf_counter()
    for i in idx:
        np.array(frames[int(i)])
    return (time.perf_counter() - t0) / n * 1e3


def video_read_ms(path: Path, n: int = 200) -> tuple[float, int]:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        count, fps = stream.frames, float(stream.average_rate)
        idx = np.random.default_rng(0).integers(0, count, n)
        t0 = time.perf_counter()
        for i in idx:
            target = i / fps
            container.seek(int(target / stream.time_base), stream=stream, backward=True)
            for frame in container.decode(stream):
                if frame.time >= target - 1e-6:
                    frame.to_ndarray(format="rgb24")
                    break
        return (time.perf_counter() - t0) / n * 1e3, count


def samples_per_s(job: list[str], data: Path, out: Path, steps: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    run([*LAPA, "train", *job, "--data", str(data), "--out", str(out), "--steps", str(steps), "--quiet",
         "--set", "train.val_every=100000", "--set", "train.save_every=100000"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "samples_per_s" in line]
    return float(np.median([r["samples_per_s"] for r in rows[1:]]))  # the first window holds the warm-up


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--episodes", type=int, default=4, help="episodes per task")
    ap.add_argument("--train-steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from lapa_training.data.dataset import Dataset

    tmp = Path(tempfile.mkdtemp(prefix="lapa-frame-storage-"))
    try:
        run([*LAPA, "data", "generate", "--out", str(tmp / "bags"), "--tasks", "reach,push,pick_place",
             "--episodes", str(args.episodes), "--image-size", "256"])
        print(f"{'size':>5} {'storage':<22} {'bytes/frame':>12} {'raw/it':>7} {'random read ms':>15} {'PSNR dB':>8}")
        for size in (128, 256):
            for codec in ("raw", "jpeg"):
                run([*LAPA, "data", "ingest", str(tmp / "bags"), "--out", str(tmp / f"{codec}{size}"), "--image-size",
                     str(size), "--frame-codec", codec])
            raw, v2 = Dataset(tmp / f"raw{size}"), Dataset(tmp / f"jpeg{size}")
            raw_bytes = raw.frames[0].nbytes
            print(f"{size:>5} {'raw (v1)':<22} {raw_bytes:>12.0f} {1.0:>7.1f} {random_read_ms(raw.frames):>15.3f} "
                  f"{'-':>8}")
            jpeg_bytes = v2.frames.disk_bytes() / len(v2)
            print(f"{size:>5} {'JPEG shards (v2)':<22} {jpeg_bytes:>12.0f} {raw_bytes / jpeg_bytes:>7.1f} "
                  f"{random_read_ms(v2.frames):>15.3f} {psnr(raw.frames, v2.frames):>8.1f}")
            run([*LAPA, "data", "export", str(tmp / f"raw{size}"), "--out", str(tmp / f"lerobot{size}")])
            video = next((tmp / f"lerobot{size}" / "videos").rglob("*.mp4"))
            ms, count = video_read_ms(video)
            print(f"{size:>5} {'AV1 video, g=2':<22} {video.stat().st_size / count:>12.0f} "
                  f"{raw_bytes * count / video.stat().st_size:>7.1f} {ms:>15.3f} {'(lerobot)':>8}")
        print(f"\ntraining on the 128 px datasets, samples/s (median of logged windows, best of {args.repeats}):")
        for name, job in (("lapa train laq", ["laq", "--config", "config/train/laq_tiny.yaml"]),
                          ("lapa train pretrain", ["pretrain", "--objective", "action", "--config",
                                                   "config/train/vla_tiny.yaml"])):
            best = {"raw": 0.0, "jpeg": 0.0}
            for _ in range(args.repeats):
                for codec in best:
                    best[codec] = max(best[codec], samples_per_s(job, tmp / f"{codec}128", tmp / "run", args.train_steps))
            print(f"  {name:<22} v1 raw {best['raw']:7.1f}   v2 JPEG {best['jpeg']:7.1f}   "
                  f"ratio {best['jpeg'] / best['raw']:.2f} (goal >= 0.9)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
