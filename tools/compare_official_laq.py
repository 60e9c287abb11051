"""Our OfficialLAQModel against the LAPA release's own LAQ code, on the same weights and frame pairs:
token ids must be equal, reconstructions equal to float precision. docs/lab-notes/official-laq.md
reports a run.

    git clone https://github.com/LatentActionPretraining/LAPA /tmp/LAPA
    pip install --target /tmp/laq-deps einops beartype      # what the release's model code imports
    PYTHONPATH=/tmp/laq-deps .venv/bin/python tools/compare_official_laq.py /tmp/LAPA/laq            # random weights
    PYTHONPATH=/tmp/laq-deps .venv/bin/python tools/compare_official_laq.py /tmp/LAPA/laq --weights laq_openx.pt

Without --weights it builds the release's model at its published size (256 px, width 1024, 8+8+8
blocks, 4 tokens of 8) with random weights, each moved off its initial value so that a swapped or
dropped tensor would show. The release's package __init__ imports its trainer's dependencies, so its
model modules are imported one by one; its NSVQ hard-codes device='cuda', which is set to the CPU.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lapa_training.laq.convert_official_laq import convert_release_state, infer_config, read_release_state  # noqa: E402

RELEASE_SIZE = dict(dim=1024, quant_dim=32, codebook_size=8, image_size=256, patch_size=32, spatial_depth=8,
                    temporal_depth=8, dim_head=64, heads=16, code_seq_len=4)


def import_release(laq_dir: Path):
    """The release's LatentActionQuantization class, from its laq/ directory."""
    package = types.ModuleType("laq_model")
    package.__path__ = [str(laq_dir / "laq_model")]
    sys.modules["laq_model"] = package
    from laq_model import nsvq

    release_init = nsvq.NSVQ.__init__
    nsvq.NSVQ.__init__ = lambda self, *a, **k: release_init(self, *a, **{**k, "device": "cpu"})
    from laq_model.latent_action_quantization import LatentActionQuantization

    return LatentActionQuantization


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("release", type=Path, help="the release's laq/ directory")
    p.add_argument("--weights", type=Path, help="a .pt state dict of the release (default: random weights)")
    p.add_argument("--pairs", type=int, default=16, help="random frame pairs to compare (default 16)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    release = import_release(args.release)(**RELEASE_SIZE).eval()
    with tempfile.TemporaryDirectory() as tmp:
        weights = args.weights
        if weights is None:
            with torch.no_grad():
                for _, t in list(release.named_parameters()) + list(release.named_buffers()):
                    if t.is_floating_point() and t.numel():
                        t.add_(0.1 * torch.randn_like(t))
            weights = Path(tmp) / "random.pt"
            torch.save(release.state_dict(), weights)
        state = read_release_state(weights)
        release.load_state_dict(state)  # the release's own loader: strict=False, 'module.' removed as here
    ours = convert_release_state(state, infer_config(state, image_size=RELEASE_SIZE["image_size"],
                                                     num_tokens=RELEASE_SIZE["code_seq_len"]), source=weights)
    video = torch.rand(args.pairs, 3, 2, RELEASE_SIZE["image_size"], RELEASE_SIZE["image_size"])
    with torch.no_grad():
        start = time.perf_counter()
        theirs = release(video, return_only_codebook_ids=True)
        their_recon = release.inference(video)
        mid = time.perf_counter()
        tokens = ours.encode_01(video[:, :, 0], video[:, :, 1])
        recon = ours.decode_01(video[:, :, 0], tokens)
        end = time.perf_counter()
    equal = torch.equal(theirs, tokens)
    print(f"{args.pairs} pairs, weights {weights if args.weights else 'random'}: token ids equal: {equal} "
          f"({int((theirs == tokens).all(1).sum())}/{args.pairs} pairs); reconstruction max |diff| "
          f"{(their_recon - recon).abs().max().item():.2e}; release {mid - start:.1f} s, ours {end - mid:.1f} s")
    print(f"tokens (first 4): {tokens[:4].tolist()}")
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
