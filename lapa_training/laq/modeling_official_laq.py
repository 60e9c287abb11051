"""The official LAPA release's LAQ (LatentActionPretraining/LAPA, `laq/`), written here so that its
published weights (`laq_openx.pt`, converted by `lapa convert laq`) label our datasets.

It computes what the release computes, layer for layer, including the release's quirks (each is named
where it happens); convert_official_laq.py maps the release's tensor names onto these modules.

    x_t, x_next in [0, 1] ─ patches (c p1 p2) ─ LayerNorm, Linear, LayerNorm
        ─ spatial blocks (each frame; a relative-position bias MLP; a causal depthwise 3-D conv, PEG)
        ─ temporal blocks (each patch position over the 2 frames)
        → e_first, e_last (B, N, D)
    NSVQ: Linear to code_dim ─ small CNN over the patch grid → L codes each; z = codes(e_last) - codes(e_first)
        → the nearest of the codebook's vectors: L token ids
    decoder: patch embeddings of x_t ─ blocks of [PEG, self-attention, cross-attention to the L
        projected codebook vectors, gated MLP] ─ Linear → pixels of x_next in [0, 1]

Attention is the release's cosine attention: queries and keys are L2-normalised, scaled per channel by
learned gains, and their dot product is multiplied by 8.

Our pipeline's frames are in [-1, 1] (frames_to_input); ``encode``/``decode`` take and give that range
and ``encode_01``/``decode_01`` the release's [0, 1].
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lapa_training.laq.configuration_official_laq import DOWNSAMPLING, OfficialLAQConfig

ATTENTION_SCALE = 8.0  # the release's fixed logit scale for its normalised queries and keys
NULL_KV = 2  # learned key/value pairs the release prepends in cross-attention


class BiaslessLayerNorm(nn.Module):
    """LayerNorm with a learned gain and a bias fixed at zero (a buffer in the release's state dict)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.register_buffer("bias", torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias)


class GatedFeedForward(nn.Module):
    """LayerNorm, Linear to 2 x inner, GEGLU (first half times GELU of the second), Linear back."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 2 * inner, bias=False)
        self.down = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.up(self.norm(x)).chunk(2, dim=-1)
        return self.down(F.gelu(gate) * value)


class PositionConv(nn.Module):
    """The release's PEG: a depthwise 3x3x3 convolution over (time, rows, cols), causal in time.

    The tokens (B', n, D) are read as the video (b, t, h, w, D) by a plain reshape. In the temporal
    blocks, whose tokens are laid out (b h w) t, that reshape does not follow the layout: the release
    does it so, and its weights were trained so."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv3d(dim, dim, 3, groups=dim)

    def forward(self, x: torch.Tensor, video_shape: tuple[int, int, int, int]) -> torch.Tensor:
        v = x.reshape(*video_shape, x.shape[-1]).permute(0, 4, 1, 2, 3)
        v = self.conv(F.pad(v, (1, 1, 1, 1, 2, 0)))  # (cols, rows, time): time padded on the past side only
        return v.permute(0, 2, 3, 4, 1).reshape(x.shape)


class Attention(nn.Module):
    """Cosine attention. Self-attention takes its keys and values from the block input before the
    norm (the release normalises only the queries' input); cross-attention normalises the context and
    prepends NULL_KV learned key/value pairs."""

    def __init__(self, dim: int, heads: int, dim_head: int, cross: bool):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.norm = BiaslessLayerNorm(dim)
        self.context_norm = BiaslessLayerNorm(dim) if cross else None
        self.q = nn.Linear(dim, inner, bias=False)
        self.kv = nn.Linear(dim, 2 * inner, bias=False)
        self.out = nn.Linear(inner, dim, bias=False)
        self.q_gain = nn.Parameter(torch.ones(dim_head))
        self.k_gain = nn.Parameter(torch.ones(dim_head))
        # the release interleaves them: rows 0, 2, .. are keys, rows 1, 3, .. values
        self.null_kv = nn.Parameter(torch.randn(heads, 2 * NULL_KV, dim_head)) if cross else None

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        b, n, _ = x.shape
        kv_input = x if self.context_norm is None else self.context_norm(context)
        q = self.q(self.norm(x))
        k, v = self.kv(kv_input).chunk(2, dim=-1)
        q, k, v = (t.view(b, t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v))
        if self.null_kv is not None:
            k = torch.cat([self.null_kv[:, 0::2].expand(b, -1, -1, -1), k], dim=2)
            v = torch.cat([self.null_kv[:, 1::2].expand(b, -1, -1, -1), v], dim=2)
        q = F.normalize(q, dim=-1) * self.q_gain
        k = F.normalize(k, dim=-1) * self.k_gain
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=ATTENTION_SCALE)
        return self.out(y.transpose(1, 2).reshape(b, n, -1))


class Block(nn.Module):
    def __init__(self, cfg: OfficialLAQConfig, cross: bool):
        super().__init__()
        self.position = PositionConv(cfg.dim)
        self.attn = Attention(cfg.dim, cfg.heads, cfg.dim_head, cross=False)
        self.cross_attn = Attention(cfg.dim, cfg.heads, cfg.dim_head, cross=True) if cross else None
        self.ff = GatedFeedForward(cfg.dim, cfg.ff_inner_dim)

    def forward(self, x, video_shape, bias=None, context=None):
        x = self.position(x, video_shape) + x
        x = self.attn(x, bias=bias) + x
        if self.cross_attn is not None:
            x = self.cross_attn(x, context=context) + x
        return self.ff(x) + x


class Stack(nn.Module):
    def __init__(self, cfg: OfficialLAQConfig, depth: int, cross: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList([Block(cfg, cross) for _ in range(depth)])
        self.norm = BiaslessLayerNorm(cfg.dim)

    def forward(self, x, video_shape, bias=None, context=None):
        for block in self.blocks:
            x = block(x, video_shape, bias=bias, context=context)
        return self.norm(x)


class RelativePositionBias(nn.Module):
    """Per-head attention bias between patches from an MLP of their signed log row/col offsets."""

    def __init__(self, dim: int, heads: int, grid: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2, dim), nn.LeakyReLU(0.1), nn.Linear(dim, dim), nn.LeakyReLU(0.1),
                                 nn.Linear(dim, heads))
        rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
        at = torch.stack([rows, cols], -1).reshape(-1, 2)
        offset = (at[:, None] - at[None]).float()
        self.register_buffer("offsets", offset.sign() * torch.log(offset.abs() + 1), persistent=False)

    def forward(self) -> torch.Tensor:
        return self.mlp(self.offsets).permute(2, 0, 1)  # (heads, N, N)


class PatchEmbedding(nn.Module):
    def __init__(self, cfg: OfficialLAQConfig):
        super().__init__()
        self.patch = cfg.patch_size
        self.norm_in = nn.LayerNorm(cfg.patch_dim)
        self.proj = nn.Linear(cfg.patch_dim, cfg.dim)
        self.norm_out = nn.LayerNorm(cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, D); each patch vector is channel-major (c p1 p2), as in the release."""
        b, c, h, w = x.shape
        p = self.patch
        patches = x.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)
        return self.norm_out(self.proj(self.norm_in(patches)))


class Quantizer(nn.Module):
    """The release's NSVQ at inference: codes of both frames' encodings, their difference, the nearest
    codebook vector."""

    def __init__(self, cfg: OfficialLAQConfig):
        super().__init__()
        self.cfg = cfg
        e = cfg.code_dim
        self.codebook = nn.Parameter(torch.randn(cfg.codebook_size, e))
        self.project_in = nn.Linear(cfg.dim, e)
        self.project_out = nn.Linear(e, cfg.dim)
        layers: list[nn.Module] = []
        for i, (kernel, stride, pad) in enumerate(DOWNSAMPLING[cfg.num_tokens]):
            layers += [nn.ReLU()] if i else []
            layers.append(nn.Conv2d(e, e, kernel, stride=stride, padding=pad))
        self.downsample = nn.Sequential(*layers)

    def codes(self, encoded: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B * L, code_dim)."""
        b, g, e = encoded.shape[0], self.cfg.grid, self.cfg.code_dim
        x = self.project_in(encoded).transpose(1, 2).reshape(b, e, g, g)
        return self.downsample(x).reshape(b, e, -1).transpose(1, 2).reshape(-1, e)

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Nearest codebook row for each row of z (M, code_dim), by the release's distance expression."""
        c = self.codebook
        dist = z.pow(2).sum(1, keepdim=True) - 2 * (z @ c.t()) + c.t().pow(2).sum(0, keepdim=True)
        return dist.argmin(1)

    def vectors(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids -> (B, L, D) decoder context. The release reshapes the looked-up (B * L, code_dim)
        rows as (B, code_dim, L) before transposing: a layout its decoder was trained with."""
        b = tokens.shape[0]
        rows = self.codebook[tokens.reshape(-1)]
        return self.project_out(rows.reshape(b, self.cfg.code_dim, -1).transpose(1, 2))


class OfficialLAQModel(nn.Module):
    def __init__(self, config: OfficialLAQConfig):
        super().__init__()
        self.config = cfg = config.validate()
        self.patch_embedding = PatchEmbedding(cfg)
        self.position_bias = RelativePositionBias(cfg.dim, cfg.heads, cfg.grid)
        self.encoder_spatial = Stack(cfg, cfg.spatial_depth)
        self.encoder_temporal = Stack(cfg, cfg.temporal_depth)
        self.quantizer = Quantizer(cfg)
        self.decoder = Stack(cfg, cfg.spatial_depth, cross=True)
        self.to_pixels = nn.Linear(cfg.dim, cfg.patch_dim)

    @property
    def codebook(self) -> torch.Tensor:
        return self.quantizer.codebook

    def _check(self, x: torch.Tensor, name: str) -> None:
        want = (self.config.channels, *self.config.image_size)
        if not torch.is_tensor(x) or not x.is_floating_point() or x.ndim != 4 or tuple(x.shape[1:]) != want:
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"{name} must be a float tensor (B, {want[0]}, {want[1]}, {want[2]}), got {shape}")

    # ---- the release's convention: RGB in [0, 1] -----------------------------------------
    @torch.no_grad()
    def encode_01(self, x_t: torch.Tensor, x_next: torch.Tensor) -> torch.Tensor:
        """Token ids (B, L) int64 of frame pairs, each frame (B, 3, H, W) RGB in [0, 1]."""
        z = self.latents_01(x_t, x_next)
        return self.quantizer.nearest(z.reshape(-1, z.shape[-1])).view(z.shape[0], -1)

    @torch.no_grad()
    def latents_01(self, x_t: torch.Tensor, x_next: torch.Tensor) -> torch.Tensor:
        """The vectors NSVQ quantizes, codes(x_next) - codes(x_t): (B, L, code_dim)."""
        self._check(x_t, "x_t")
        self._check(x_next, "x_next")
        cfg, b = self.config, x_t.shape[0]
        g, n, d = cfg.grid, cfg.grid ** 2, cfg.dim
        video_shape = (b, 2, g, g)
        tokens = self.patch_embedding(torch.cat([x_t, x_next]))  # (2B, N, D): frame-major
        h = tokens.view(2, b, n, d).transpose(0, 1).reshape(b * 2, n, d)
        h = self.encoder_spatial(h, video_shape, bias=self.position_bias())
        h = h.view(b, 2, n, d).transpose(1, 2).reshape(b * n, 2, d)
        h = self.encoder_temporal(h, video_shape).view(b, n, 2, d)
        z = self.quantizer.codes(h[:, :, 1]) - self.quantizer.codes(h[:, :, 0])
        return z.view(b, cfg.num_tokens, cfg.code_dim)

    @torch.no_grad()
    def decode_01(self, x_t: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """x_next predicted (B, 3, H, W), [0, 1] scale and unclamped, from x_t in [0, 1] and tokens (B, L)."""
        self._check(x_t, "x_t")
        cfg = self.config
        tokens = torch.as_tensor(tokens, dtype=torch.int64, device=x_t.device)
        if tokens.ndim == 1:
            tokens = tokens.expand(x_t.shape[0], -1)
        if tokens.shape != (x_t.shape[0], cfg.num_tokens):
            raise ValueError(f"tokens have shape {tuple(tokens.shape)}, expected ({x_t.shape[0]}, {cfg.num_tokens})")
        if tokens.min() < 0 or tokens.max() >= cfg.codebook_size:
            raise ValueError(f"tokens must be in [0, {cfg.codebook_size}), got [{int(tokens.min())}, "
                             f"{int(tokens.max())}]")
        b, g, p, c = x_t.shape[0], cfg.grid, cfg.patch_size, cfg.channels
        x = self.decoder(self.patch_embedding(x_t), (b, 1, g, g), bias=self.position_bias(),
                         context=self.quantizer.vectors(tokens))
        pixels = self.to_pixels(x).view(b, g, g, c, p, p)
        return pixels.permute(0, 3, 1, 4, 2, 5).reshape(b, c, g * p, g * p)

    # ---- the pipeline's convention (frames_to_input): [-1, 1] ----------------------------
    def encode(self, x_t: torch.Tensor, x_next: torch.Tensor) -> torch.Tensor:
        return self.encode_01((x_t + 1) * 0.5, (x_next + 1) * 0.5)

    def decode(self, x_t: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.decode_01((x_t + 1) * 0.5, tokens) * 2 - 1

    # ---- persistence ---------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, *, extra: dict | None = None) -> Path:
        from lapa_training.checkpoint import save_checkpoint

        return save_checkpoint(directory, self, self.config.to_dict(), extra=extra)

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> "OfficialLAQModel":
        from lapa_training.checkpoint import CheckpointError, load_checkpoint, load_model_state

        state, saved, _ = load_checkpoint(directory, device=map_location)
        try:
            config = OfficialLAQConfig.from_dict(saved)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"checkpoint {directory} does not hold a valid official LAQ config: {e}") from e
        model = cls(config)
        load_model_state(model, state, source=directory)
        return model.to(map_location).eval()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
