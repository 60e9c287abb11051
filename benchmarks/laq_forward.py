"""LAQ speed: encode throughput (frame pairs/s, what labelling a dataset costs) and training-step
time (forward + backward + AdamW step) for the presets.

    .venv/bin/python benchmarks/laq_forward.py [--presets tiny small] [--batch 32] [--seconds 3]
                                                [--threads N] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import torch

from lapa_training.laq import LAQConfig, LAQModel


def timed(fn, seconds: float) -> float:
    """Seconds per call of fn, after one warm-up call, averaged over about `seconds`."""
    fn()
    calls, t0 = 0, time.perf_counter()
    while calls < 2 or time.perf_counter() - t0 < seconds:
        fn()
        calls += 1
    return (time.perf_counter() - t0) / calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"], choices=["tiny", "small", "paper"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=3.0, help="wall time per measurement")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, batch {args.batch}")
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    for name in args.presets:
        cfg = getattr(LAQConfig, name)()
        torch.manual_seed(0)
        model = LAQModel(cfg).to(args.device)
        h, w = cfg.image_size
        x_t = torch.rand(args.batch, 3, h, w, device=args.device) * 2 - 1
        x_next = torch.rand(args.batch, 3, h, w, device=args.device) * 2 - 1
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def train_step():
            out = model(x_t, x_next)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            sync()

        def encode():
            model.encode(x_t, x_next)
            sync()

        model.train()
        step_s = timed(train_step, args.seconds)
        model.eval()
        encode_s = timed(encode, args.seconds)
        print(f"{name:6s} {h}x{w} patch {cfg.patch_size} dim {cfg.dim} ({model.num_parameters() / 1e6:.1f} M params): "
              f"train step {step_s * 1e3:.0f} ms ({args.batch / step_s:.0f} pairs/s), "
              f"encode {encode_s * 1e3:.0f} ms ({args.batch / encode_s:.0f} pairs/s)")


if __name__ == "__main__":
    main()
