"""LAQ: Latent Action Quantization (stage 1 of LAPA, Ye et al. 2025).

A VQ-VAE over frame pairs. The encoder sees x_t and x_{t+H}; the difference of their embeddings is
quantized into L discrete latent-action tokens; the decoder must rebuild x_{t+H} from x_t plus
those tokens, so the tokens have to say what changed (the "action").

    x_t, x_next ─ patch embed (+ spatial pos, + time embedding)
                ─ spatial blocks (attention within each frame)
                ─ causal temporal blocks (attention over the 2 time steps at each patch position)
                → e1 (sees only x_t), e2 (sees both)
    d = e2 - e1 ─ strided conv over the patch grid → L vectors of code_dim
                ─ NSVQ → tokens (B, L) int64, quantized vectors
    decoder: detached patch embeddings of x_t (+ own pos) ─ blocks of [self-attn, cross-attn to
             the L action vectors (or: actions added once, "additive"), MLP] ─ linear → pixels

Value ranges: model inputs are float (B, 3, H, W) in [-1, 1] (``frames_to_input`` turns the
dataset's uint8 (B, H, W, 3) frames into that); the reconstruction is in the same [-1, 1] scale,
unclamped (``output_to_uint8`` clamps and converts back for display). Loss: MSE only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lapa_training.image_processing import preprocess_images
from lapa_training.laq.configuration_laq import TRAINING_ONLY_KEYS, LAQConfig


# ---------------------------------------------------------------------------------------------
# frames in and out
# ---------------------------------------------------------------------------------------------
def frames_to_input(frames: np.ndarray | torch.Tensor, device: torch.device | str | None = None,
                    size: tuple[int, int] | None = None) -> torch.Tensor:
    """uint8 RGB frames (B, H, W, 3) or (H, W, 3), numpy or torch -> float32 (B, 3, H, W) in [-1, 1].

    With `size` (h, w) different from the frames' own, they are resized (on `device`; see
    lapa_training.image_processing), so a model trained at 64x64 can read a 128x128 dataset;
    training, labelling and evaluation all go through here, so they see the same pixels."""
    return preprocess_images(frames, size, device=device, what="frames_to_input: frames")


def output_to_uint8(x: torch.Tensor) -> np.ndarray:
    """Model-scale images (B, 3, H, W) in [-1, 1] (clamped) -> uint8 RGB numpy (B, H, W, 3)."""
    x = ((x.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


# ---------------------------------------------------------------------------------------------
# transformer pieces
# ---------------------------------------------------------------------------------------------
class Attention(nn.Module):
    """Multi-head attention; self-attention when no context is given."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        b, n, d = x.shape
        context = x if context is None else context
        q = self.q(x).view(b, n, self.heads, -1).transpose(1, 2)
        k, v = self.kv(context).view(b, context.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block: self-attention, optional cross-attention to a context, MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float, cross: bool = False,
                 causal: bool = False):
        super().__init__()
        self.causal = causal
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        if cross:
            self.norm_cross = nn.LayerNorm(dim)
            self.norm_context = nn.LayerNorm(dim)
            self.cross_attn = Attention(dim, heads, dropout)
        else:
            self.cross_attn = None
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim), nn.Dropout(dropout))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), causal=self.causal))
        if self.cross_attn is not None:
            x = x + self.drop(self.cross_attn(self.norm_cross(x), context=self.norm_context(context)))
        return x + self.mlp(self.norm2(x))


def sincos_2d(rows: int, cols: int, dim: int) -> torch.Tensor:
    """(1, rows * cols, dim) 2-D sine-cosine position code (half the channels for the row, half for
    the column), the starting value of the learned position embeddings: neighbouring patches start
    out with similar codes, which attention needs to learn "look at the patch next to me"."""
    quarter = dim // 4
    freq = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float32) / max(quarter, 1)))
    r = torch.arange(rows, dtype=torch.float32)[:, None, None] * freq
    c = torch.arange(cols, dtype=torch.float32)[None, :, None] * freq
    r, c = r.expand(rows, cols, quarter), c.expand(rows, cols, quarter)
    code = torch.cat([r.sin(), r.cos(), c.sin(), c.cos()], dim=-1).reshape(1, rows * cols, 4 * quarter)
    return F.pad(code, (0, dim - 4 * quarter))


# ---------------------------------------------------------------------------------------------
# encoder
# ---------------------------------------------------------------------------------------------
class LAQEncoder(nn.Module):
    def __init__(self, cfg: LAQConfig):
        super().__init__()
        d = cfg.dim
        self.patch_embed = nn.Conv2d(cfg.channels, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.spatial_pos = nn.Parameter(sincos_2d(*cfg.patch_grid, d))
        self.time_embed = nn.Parameter(torch.randn(1, 2, 1, d) * 0.02)
        args = (d, cfg.heads, cfg.mlp_ratio, cfg.dropout)
        self.spatial = nn.ModuleList([Block(*args) for _ in range(cfg.spatial_depth)])
        self.temporal = nn.ModuleList([Block(*args, causal=True) for _ in range(cfg.temporal_depth)])
        self.norm = nn.LayerNorm(d)

    def embed_patches(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> patch tokens (B, N, D), with the spatial position embedding added."""
        return self.patch_embed(x).flatten(2).transpose(1, 2) + self.spatial_pos

    def forward(self, x_t: torch.Tensor, x_next: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (patch tokens of x_t (B, N, D), e1 (B, N, D), e2 (B, N, D))."""
        b = x_t.shape[0]
        tokens = self.embed_patches(torch.cat([x_t, x_next]))  # one conv for both frames
        n, d = tokens.shape[1:]
        first = tokens[:b]
        h = tokens.view(2, b, n, d).transpose(0, 1) + self.time_embed  # (B, 2, N, D)
        h = h.reshape(b * 2, n, d)
        for block in self.spatial:  # each frame's patches attend to each other
            h = block(h)
        h = h.view(b, 2, n, d).transpose(1, 2).reshape(b * n, 2, d)
        for block in self.temporal:  # each patch position attends over time, causally
            h = block(h)
        h = self.norm(h).view(b, n, 2, d)
        return first, h[:, :, 0], h[:, :, 1]


# ---------------------------------------------------------------------------------------------
# quantizer
# ---------------------------------------------------------------------------------------------
def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class NSVQ(nn.Module):
    """Noise-substitution vector quantization (Vali & Backstrom 2022) with dead-code replacement.

    Training: the output is z + ||z - q|| * v / ||v|| (v ~ N(0, I)): as far from z as the nearest
    code q is, but in a random direction. Gradients reach the encoder through z and the codebook
    through ||z - q||. Eval (and ``lookup``): exactly q.

    Every training forward is one step. ``usage_counts`` counts code use since the last
    replacement; at the steps the config's schedule names, codes with count 0 are re-initialised to
    random vectors z of the current batch, then the counts restart. Counts and the step counter are
    buffers, so they are saved and restored with the model.
    """

    def __init__(self, cfg: LAQConfig):
        super().__init__()
        self.cfg = cfg
        self.codebook = nn.Parameter(torch.randn(cfg.codebook_size, cfg.code_dim))
        self.register_buffer("usage_counts", torch.zeros(cfg.codebook_size, dtype=torch.int64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code (squared Euclidean) for each row of z (M, code_dim) -> (M,)."""
        z, c = z.detach().float(), self.codebook.detach().float()  # float32 even under autocast
        dist = z.pow(2).sum(1, keepdim=True) - 2 * z @ c.t() + c.pow(2).sum(1)
        return dist.argmin(1)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        return F.embedding(indices, self.codebook)

    @torch.no_grad()
    def replace_dead_codes(self, z: torch.Tensor) -> int:
        """Re-initialise codes unused since the last replacement to random rows of z; restart counts.
        Under torch.distributed the counts are global (summed every step) and the new codes come
        from rank 0's batch, so every process keeps the same codebook."""
        dead = (self.usage_counts == 0).nonzero().squeeze(1)
        if len(dead):
            pick = torch.randint(0, z.shape[0], (len(dead),), device=z.device)
            new_codes = z[pick].detach().to(self.codebook.dtype).contiguous()
            if _distributed():
                torch.distributed.broadcast(new_codes, src=0)
            self.codebook[dead] = new_codes
        self.usage_counts.zero_()
        return len(dead)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """z (M, code_dim) -> (quantized (M, code_dim), indices (M,) int64, number of codes replaced)."""
        replaced = 0
        if self.training:
            self.steps += 1
            if self.cfg.is_replacement_step(int(self.steps)):
                replaced = self.replace_dead_codes(z)
        indices = self.nearest(z)
        q = self.lookup(indices)
        if not self.training:
            return q, indices, replaced
        counts = torch.bincount(indices, minlength=self.codebook.shape[0])
        if _distributed():
            torch.distributed.all_reduce(counts)
        self.usage_counts += counts
        noise = torch.randn_like(z)
        error_norm = (z - q).norm(dim=1, keepdim=True)
        noise = noise / (noise.norm(dim=1, keepdim=True) + 1e-12)
        return z + error_norm * noise, indices, replaced


# ---------------------------------------------------------------------------------------------
# decoder
# ---------------------------------------------------------------------------------------------
class LAQDecoder(nn.Module):
    def __init__(self, cfg: LAQConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.pos = nn.Parameter(sincos_2d(*cfg.patch_grid, d))
        self.action_in = nn.Linear(cfg.code_dim, d)
        self.action_pos = nn.Parameter(torch.randn(1, cfg.num_tokens, d) * 0.02)
        cross = cfg.conditioning == "cross_attention"
        self.blocks = nn.ModuleList([Block(d, cfg.heads, cfg.mlp_ratio, cfg.dropout, cross=cross)
                                     for _ in range(cfg.decoder_depth)])
        self.norm = nn.LayerNorm(d)
        self.to_pixels = nn.Linear(d, cfg.patch_size ** 2 * cfg.channels)

    def forward(self, xt_tokens: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """xt_tokens (B, N, D) (already detached), actions (B, L, code_dim) -> image (B, C, H, W)."""
        cfg = self.cfg
        a = self.action_in(actions) + self.action_pos  # (B, L, D)
        x = xt_tokens + self.pos
        if cfg.conditioning == "additive":  # Genie-style: broadcast each action token over its block
            (ah, aw), (kh, kw) = cfg.action_grid, cfg.pool_block
            grid = a.view(-1, ah, aw, cfg.dim).repeat_interleave(kh, 1).repeat_interleave(kw, 2)
            x = x + grid.reshape(x.shape)
        for block in self.blocks:
            x = block(x, context=a)
        pixels = self.to_pixels(self.norm(x))  # (B, N, p*p*C)
        (gh, gw), p, c = cfg.patch_grid, cfg.patch_size, cfg.channels
        return pixels.view(-1, gh, gw, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(-1, c, gh * p, gw * p)


# ---------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------
@dataclass
class LAQOutput:
    loss: torch.Tensor  # scalar reconstruction MSE (model scale, [-1, 1] images)
    recon: torch.Tensor  # predicted x_next (B, C, H, W)
    tokens: torch.Tensor  # (B, L) int64 latent-action tokens
    perplexity: torch.Tensor  # scalar, exp(entropy) of this batch's code histogram (1 .. codebook_size)
    codebook_usage: torch.Tensor  # scalar, fraction of the codebook used in this batch
    replaced_codes: int = 0  # dead codes re-initialised in this forward (training only)


class LAQModel(nn.Module):
    def __init__(self, config: LAQConfig):
        super().__init__()
        self.config = config.validate()
        cfg = config
        self.encoder = LAQEncoder(cfg)
        # d = e2 - e1 on the (gh, gw) patch grid -> (ah, aw) grid of code_dim vectors: a strided conv,
        # i.e. one learned linear map per block of patches (keeps where in the block things moved).
        self.to_code = nn.Conv2d(cfg.dim, cfg.code_dim, kernel_size=cfg.pool_block, stride=cfg.pool_block)
        self.quantizer = NSVQ(cfg)
        self.decoder = LAQDecoder(cfg)
        self.apply(_init_weights)

    # ---- pieces --------------------------------------------------------------------------
    @property
    def codebook(self) -> torch.Tensor:
        """The codebook (codebook_size, code_dim), a trainable parameter."""
        return self.quantizer.codebook

    def _check(self, x: torch.Tensor, name: str) -> None:
        c, (h, w) = self.config.channels, self.config.image_size
        if not torch.is_tensor(x) or not x.is_floating_point():
            raise ValueError(f"{name} must be a float tensor (B, {c}, {h}, {w}) in [-1, 1]; "
                             f"use frames_to_input() for uint8 frames")
        if x.ndim != 4 or tuple(x.shape[1:]) != (c, h, w):
            raise ValueError(f"{name} has shape {tuple(x.shape)}, this model expects (B, {c}, {h}, {w})")

    def encode_frames(self, x_t: torch.Tensor, x_next: torch.Tensor):
        """-> (patch tokens of x_t, e1, e2), each (B, N, D)."""
        self._check(x_t, "x_t")
        self._check(x_next, "x_next")
        return self.encoder(x_t, x_next)

    def _latents(self, e1: torch.Tensor, e2: torch.Tensor) -> torch.Tensor:
        """(e2 - e1) -> (B, L, code_dim), L in row-major order over the action grid."""
        gh, gw = self.config.patch_grid
        d = (e2 - e1).transpose(1, 2).reshape(e1.shape[0], -1, gh, gw)
        return self.to_code(d).flatten(2).transpose(1, 2)

    # ---- training ------------------------------------------------------------------------
    def forward(self, x_t: torch.Tensor, x_next: torch.Tensor) -> LAQOutput:
        """Training (and evaluation) pass: reconstruct x_next from x_t and the latent action."""
        xt_tokens, e1, e2 = self.encode_frames(x_t, x_next)
        z = self._latents(e1, e2)
        b, l, c = z.shape
        q, indices, replaced = self.quantizer(z.reshape(b * l, c))
        recon = self.decoder(xt_tokens.detach(), q.view(b, l, c))
        loss = F.mse_loss(recon, x_next)
        with torch.no_grad():
            counts = torch.bincount(indices, minlength=self.config.codebook_size).float()
            probs = counts / counts.sum()
            perplexity = torch.exp(-(probs * torch.log(probs.clamp_min(1e-12))).sum())
            usage = (counts > 0).float().mean()
        return LAQOutput(loss=loss, recon=recon, tokens=indices.view(b, l), perplexity=perplexity,
                         codebook_usage=usage, replaced_codes=replaced)

    # ---- inference -----------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, x_t: torch.Tensor, x_next: torch.Tensor) -> torch.Tensor:
        """Latent-action tokens (B, L) int64 of each frame pair. No noise, no decoder, no state
        change; call ``model.eval()`` first when the config has dropout."""
        _, e1, e2 = self.encode_frames(x_t, x_next)
        z = self._latents(e1, e2)
        return self.quantizer.nearest(z.reshape(-1, z.shape[-1])).view(z.shape[0], -1)

    def decode(self, x_t: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Predicted x_next (B, C, H, W) for frames x_t and tokens (B, L) (or (L,) for all frames)."""
        self._check(x_t, "x_t")
        tokens = torch.as_tensor(tokens, dtype=torch.int64, device=x_t.device)
        if tokens.ndim == 1:
            tokens = tokens.expand(x_t.shape[0], -1)
        if tokens.shape != (x_t.shape[0], self.config.num_tokens):
            raise ValueError(f"tokens have shape {tuple(tokens.shape)}, expected ({x_t.shape[0]}, "
                             f"{self.config.num_tokens})")
        if tokens.min() < 0 or tokens.max() >= self.config.codebook_size:
            raise ValueError(f"tokens must be in [0, {self.config.codebook_size}), got "
                             f"[{int(tokens.min())}, {int(tokens.max())}]")
        xt_tokens = self.encoder.embed_patches(x_t).detach()
        return self.decoder(xt_tokens, self.quantizer.lookup(tokens))

    # ---- persistence ---------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, *, extra: dict | None = None) -> Path:
        from lapa_training.checkpoint import save_checkpoint

        return save_checkpoint(directory, self, self.config.to_dict(), step=int(self.quantizer.steps),
                               extra=extra)

    @classmethod
    def from_pretrained(cls, directory: str | Path, config: LAQConfig | None = None,
                        map_location: str | torch.device = "cpu") -> "LAQModel":
        """Load a saved model. With `config`, check it matches the saved one (except training-only
        keys such as dropout) and build the model from `config`."""
        from lapa_training.checkpoint import CheckpointError, check_config_compatible, load_checkpoint, \
            load_model_state

        state, saved, _ = load_checkpoint(directory, device=map_location)
        try:
            saved_config = LAQConfig.from_dict(saved)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"checkpoint {directory} does not hold a valid LAQ config: {e}") from e
        if config is not None:
            check_config_compatible(saved_config.to_dict(), config.to_dict(), source=directory,
                                    ignore=TRAINING_ONLY_KEYS)
        model = cls(config or saved_config)
        load_model_state(model, state, source=directory)
        return model.to(map_location)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
