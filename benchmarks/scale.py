"""Ingest and label a synthetic corpus of many short episodes: throughput, peak memory, disk.

    .venv/bin/python benchmarks/scale.py [--sizes 2500,5000,10000,20000] [--frames 12] [--size 64]
                                         [--workers 2] [--frame-codec jpeg]

Writes max(--sizes) episode bags once (MCAP; a 10 Hz sensor_msgs/CompressedImage camera, as arms
record it, twists and gripper commands, an instruction), then for each size ingests the first
that many into a fresh dataset (`lapa data ingest --workers W --frame-codec C`) and labels it with
a tiny random-weight LAQ (`lapa label`), each command a process of its own, timed by GNU time for
wall seconds and peak resident memory (its largest process). Reports episodes/s, frames/s, peak
RSS and disk per frame for each size: the memory columns must stay flat as the corpus grows.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_corpus(folder: Path, episodes: int, frames: int, size: int) -> None:
    """Short episode bags with compressed camera frames (each episode its own smooth image)."""
    import cv2
    from rosbags.rosbag2 import Writer
    from tqdm import tqdm

    from lapa_training.data import bag_format
    from lapa_training.data.bag_format import typestore

    ts = typestore()
    t = ts.types
    y, x = np.mgrid[0:size, 0:size] / size
    vec = t["geometry_msgs/msg/Vector3"]
    rng = np.random.default_rng(0)
    for e in tqdm(range(episodes), desc="writing bags", unit="ep", file=sys.stderr):
        colours = rng.uniform(20, 230, (2, 3))
        with Writer(folder / f"episode_{e:06d}", version=9) as w:
            w.set_custom_data("lapa.instruction", f"move the block {('left', 'right', 'up', 'down')[e % 4]}")
            img = w.add_connection("/camera/image_raw/compressed", "sensor_msgs/msg/CompressedImage", typestore=ts)
            tw = w.add_connection(bag_format.TWIST_TOPIC, "geometry_msgs/msg/TwistStamped", typestore=ts)
            gr = w.add_connection(bag_format.GRIPPER_TOPIC, "std_msgs/msg/Float64", typestore=ts)
            t0 = 1_700_000_000 * 10**9 + e * 10**10
            for k in range(frames):
                t_ns = t0 + k * 100_000_000
                shift = k / frames
                rgb = (colours[0] * (1 - x[..., None]) + colours[1] * ((y + shift) % 1)[..., None]).astype(np.uint8)
                jpeg = cv2.imencode(".jpg", rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])[1]
                stamp = t["builtin_interfaces/msg/Time"](sec=t_ns // 10**9, nanosec=t_ns % 10**9)
                header = t["std_msgs/msg/Header"](stamp=stamp, frame_id="camera")
                w.write(img, t_ns, ts.serialize_cdr(t["sensor_msgs/msg/CompressedImage"](
                    header=header, format="jpeg", data=jpeg.reshape(-1)), "sensor_msgs/msg/CompressedImage"))
                v = rng.normal(size=6) * 0.05
                twist = t["geometry_msgs/msg/TwistStamped"](
                    header=t["std_msgs/msg/Header"](stamp=stamp, frame_id=bag_format.BASE_FRAME),
                    twist=t["geometry_msgs/msg/Twist"](linear=vec(x=v[0], y=v[1], z=v[2]),
                                                       angular=vec(x=v[3], y=v[4], z=v[5])))
                w.write(tw, t_ns, ts.serialize_cdr(twist, "geometry_msgs/msg/TwistStamped"))
                w.write(gr, t_ns, ts.serialize_cdr(t["std_msgs/msg/Float64"](data=float(k % 2)),
                                                   "std_msgs/msg/Float64"))


def timed(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB of the command's largest process) of one command."""
    done = subprocess.run(["/usr/bin/time", "-f", "%e %M", *argv], cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    wall, rss_kb = done.stderr.strip().splitlines()[-1].split()
    return float(wall), float(rss_kb) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="2500,5000,10000,20000", help="corpus sizes (episodes), comma-separated")
    ap.add_argument("--frames", type=int, default=12, help="frames per episode (1.2 s at 10 Hz)")
    ap.add_argument("--size", type=int, default=64, help="camera and dataset frame size (px)")
    ap.add_argument("--workers", type=int, default=2, help="ingest processes")
    ap.add_argument("--frame-codec", default="jpeg", choices=("raw", "jpeg"))
    ap.add_argument("--keep", type=Path, help="write the corpus here and keep it (default: a temporary folder)")
    args = ap.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    import torch

    from lapa_training.laq import LAQConfig, LAQModel

    tmp = Path(tempfile.mkdtemp(prefix="lapa-scale-"))
    corpus = args.keep or tmp / "bags"
    try:
        corpus.mkdir(parents=True, exist_ok=True)
        have = len(list(corpus.glob("episode_*")))
        if have < sizes[-1]:
            shutil.rmtree(corpus)
            corpus.mkdir(parents=True)
            t0 = time.perf_counter()
            write_corpus(corpus, sizes[-1], args.frames, args.size)
            print(f"wrote {sizes[-1]} bags in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        torch.manual_seed(0)
        laq = LAQModel(LAQConfig.tiny(image_size=args.size))
        laq_dir = Path(laq.save_pretrained(tmp / "laq"))
        lapa = [sys.executable, "-m", "lapa_cli.main"]
        rows = []
        for n in sizes:
            inputs = tmp / f"inputs_{n}"
            inputs.mkdir()
            for bag in sorted(corpus.glob("episode_*"))[:n]:
                (inputs / bag.name).symlink_to(bag.resolve())
            data = tmp / f"data_{n}"
            ingest_s, ingest_mb = timed([*lapa, "data", "ingest", str(inputs), "--out", str(data), "--image-size",
                                         str(args.size), "--frame-codec", args.frame_codec, "--workers",
                                         str(args.workers)])
            label_s, label_mb = timed([*lapa, "label", "--laq", str(laq_dir), "--data", str(data), "--quiet"])
            from lapa_training.data.dataset import Dataset

            ds = Dataset(data)
            frames, disk = len(ds), ds.disk_bytes()
            rows.append((n, frames, ingest_s, ingest_mb, label_s, label_mb, disk / frames))
            print(f"  {n} episodes: ingest {ingest_s:.0f} s, label {label_s:.0f} s", file=sys.stderr)
            shutil.rmtree(data)
            shutil.rmtree(inputs)
        print(f"\n{args.frames} frames per episode at {args.size} px, {args.frame_codec} frames, ingest with "
              f"{args.workers} processes, labelling with a tiny LAQ on 1 process (CPU)")
        print(f"{'episodes':>9} {'frames':>8} {'ingest ep/s':>12} {'frames/s':>9} {'peak RSS MiB':>13} "
              f"{'label ep/s':>11} {'frames/s':>8} {'peak RSS MiB':>13} {'disk B/frame':>13}")
        for n, frames, ingest_s, ingest_mb, label_s, label_mb, per_frame in rows:
            print(f"{n:>9} {frames:>8} {n / ingest_s:>12.0f} {frames / ingest_s:>9.0f} {ingest_mb:>13.0f} "
                  f"{n / label_s:>11.0f} {frames / label_s:>8.0f} {label_mb:>13.0f} {per_frame:>13.0f}")
        first, last = rows[0], rows[-1]
        print(f"peak RSS from {first[0]} to {last[0]} episodes: ingest {last[3] - first[3]:+.0f} MiB, "
              f"label {last[5] - first[5]:+.0f} MiB")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
