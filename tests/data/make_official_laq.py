"""How tests/data/official_laq/ was made: a tiny LAQ of the official LAPA release's architecture
(LatentActionPretraining/LAPA, laq/laq_model, commit 46aca51), its weights as the release saves them,
and what the release's own code computes from them on fixed frame pairs.

    python tests/data/make_official_laq.py <LAPA checkout>/laq tests/data/official_laq

Needs torch, einops and beartype; imports the release's model as tools/compare_official_laq.py does.
Every weight and buffer is moved off its initial value (ones, zeros) so that a swapped or dropped
tensor changes the outputs. tests/test_official_laq.py converts the weights and compares."""
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
from compare_official_laq import import_release  # noqa: E402

release, out = Path(sys.argv[1]), Path(sys.argv[2])
LatentActionQuantization = import_release(release)
torch.manual_seed(0)
DIM = 16
model = LatentActionQuantization(dim=DIM, quant_dim=8, codebook_size=8, image_size=64, patch_size=8, spatial_depth=2,
                                 temporal_depth=2, dim_head=8, heads=2, code_seq_len=4).eval()
with torch.no_grad():
    for _, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and t.numel():
            t.add_(0.1 * torch.randn_like(t))
out.mkdir(parents=True, exist_ok=True)
torch.save(model.state_dict(), out / "laq_tiny.pt")

frames = np.random.default_rng(0).integers(0, 256, (4, 2, 64, 64, 3), dtype=np.uint8)  # pairs (x_t, x_next)
video = torch.from_numpy(frames).permute(0, 4, 1, 2, 3).float().div(255)  # (B, C, 2, H, W), as ToTensor gives
with torch.no_grad():
    tokens = model(video, return_only_codebook_ids=True)
    first, last = model.encode(torch.cat([model.to_patch_emb_first_frame(video[:, :, :1]),
                                          model.to_patch_emb_first_frame(video[:, :, 1:])], dim=1))
    b = len(frames)
    z = model.vq.encode(last.reshape(b, -1, DIM), b) - model.vq.encode(first.reshape(b, -1, DIM), b)
    recon = model.inference(video)  # x_next decoded from the pair's own tokens
np.savez(out / "expected.npz", frames=frames, tokens=tokens.numpy(), z=z.numpy(), recon=recon.numpy())
print(f"wrote {out}: tokens {tokens.tolist()}")
