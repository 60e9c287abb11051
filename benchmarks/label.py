"""Labelling throughput (`lapa label`) as a ratio to a bare batched forward pass of the LAQ encoder.

The bare pass is `model.encode` on batches already in memory as float tensors: the most labelling
could ever do. `lapa label` adds reading the frames from the dataset's memory map, uint8 -> float
(and resize), and writing the tokens. Goal: ratio >= 0.8.

    .venv/bin/python benchmarks/label.py [--data DATASET] [--preset tiny] [--batch 256] [--threads 2]
    .venv/bin/python benchmarks/label.py --preset official --device cuda   # the LAPA release's LAQ, random weights

Without --data, a simulator dataset is generated in a temporary folder (about 20 s).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lapa_training.data.dataset import Dataset
from lapa_training.laq import LAQConfig, LAQModel, frames_to_input
from lapa_training.laq.labelling import encode_pairs, label_dataset, label_pairs


def make_dataset(root: Path, size: int, episodes: int) -> Path:
    from lapa_training.data.generate import generate
    from lapa_training.data.ingest import IngestOptions, ingest

    generate(root / "bags", ["reach", "push", "pick_place"], episodes, image_size=size, progress=False)
    ingest([root / "bags"], root / "data", IngestOptions(image_size=size, progress=False, warn=lambda m: None))
    return root / "data"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, help="dataset to label (default: generate one)")
    ap.add_argument("--preset", default="tiny", choices=["tiny", "small", "paper", "official"],
                    help="official: the LAPA release's architecture (what `lapa convert laq` loads)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--episodes", type=int, default=4, help="episodes per task when generating")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="best of this many runs of each")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.preset == "official":
        from lapa_training.laq.configuration_official_laq import OfficialLAQConfig
        from lapa_training.laq.modeling_official_laq import OfficialLAQModel

        cfg = OfficialLAQConfig()
        model = OfficialLAQModel(cfg).to(args.device).eval()
    else:
        cfg = getattr(LAQConfig, args.preset)()
        model = LAQModel(cfg).to(args.device).eval()
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or make_dataset(Path(tmp), cfg.image_size[0], args.episodes)
        ds = Dataset(data)
        pairs = label_pairs(ds)
        n = len(pairs)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}; LAQ {args.preset} "
              f"({model.num_parameters() / 1e6:.2f} M params); {n} pairs of {ds.frames.shape[1]}x{ds.frames.shape[2]} "
              f"frames; batch {args.batch}")

        # bare: the same pairs as float tensors already in memory, batched forward only
        x_t = frames_to_input(np.asarray(ds.frames)[pairs[:, 0]], args.device, cfg.image_size)
        x_next = frames_to_input(np.asarray(ds.frames)[pairs[:, 1]], args.device, cfg.image_size)

        def bare():
            with torch.no_grad():
                for s in range(0, n, args.batch):
                    model.encode(x_t[s:s + args.batch], x_next[s:s + args.batch])
            sync()

        def pipeline():
            encode_pairs(model, ds, pairs, batch_size=args.batch, device=args.device, progress=False)
            sync()

        def full():
            label_dataset(model, data, name="benchmark", batch_size=args.batch, device=args.device,
                          overwrite=True, progress=False)

        def best(fn) -> float:
            fn()  # warm-up
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return min(times)

        t_bare, t_pipe, t_full = best(bare), best(pipeline), best(full)
        print(f"bare encoder forward       {n / t_bare:9.1f} pairs/s")
        print(f"encode_pairs (read+encode) {n / t_pipe:9.1f} pairs/s   ratio {t_bare / t_pipe:.2f}")
        print(f"lapa label (all, + write)  {n / t_full:9.1f} pairs/s   ratio {t_bare / t_full:.2f}   (goal >= 0.8)")
        if args.data:
            import shutil

            shutil.rmtree(Path(data) / "labels" / "benchmark", ignore_errors=True)


if __name__ == "__main__":
    main()
