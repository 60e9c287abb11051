"""Configuration of the official LAPA release's LAQ architecture (LatentActionPretraining/LAPA, `laq/`),
the model its published weights (`laq_openx.pt`) belong to. Our own LAQ is configuration_laq.py.

The defaults are the release's: 256x256 RGB in [0, 1], patch 32 (an 8x8 grid), width 1024, 8 spatial and
8 temporal encoder blocks, 8 decoder blocks (the release ties the decoder depth to the spatial depth),
16 heads of 64, codes of 32 from a codebook of 8, 4 tokens per frame pair.

How NSVQ turns the (grid x grid) map of code vectors into `num_tokens` tokens is fixed per token count
(the release's small CNNs); DOWNSAMPLING lists them as (kernel, stride, padding) convolutions.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any

from lapa_training.dataclass_dict import dataclass_kwargs

MODEL_TYPE = "official_laq"

# num_tokens -> the release's NSVQ convolutions, ((kh, kw), stride, padding) each, ReLU in between
DOWNSAMPLING: dict[int, tuple[tuple[tuple[int, int], int, int], ...]] = {
    1: (((3, 3), 2, 1), ((4, 4), 1, 0)),
    2: (((3, 3), 2, 1), ((3, 4), 1, 0)),
    4: (((3, 3), 2, 1), ((3, 3), 1, 0)),
    16: (((3, 3), 2, 1), ((3, 3), 2, 1)),
    64: (((3, 3), 2, 1),),
    256: (((3, 3), 2, 1),),
}
SSV2_WINDOW_S = 2.5  # the release trains on Something-Something v2 pairs 30 frames apart, at 12 fps


@dataclass
class OfficialLAQConfig:
    image_size: tuple[int, int] = (256, 256)  # square (the release's NSVQ needs it); an int means square
    patch_size: int = 32
    channels: int = 3
    dim: int = 1024
    heads: int = 16
    dim_head: int = 64
    spatial_depth: int = 8  # also the decoder's depth, as in the release
    temporal_depth: int = 8
    code_dim: int = 32  # the release's quant_dim
    codebook_size: int = 8
    num_tokens: int = 4  # the release's code_seq_len
    window_s: float = SSV2_WINDOW_S  # metadata: seconds between the frames of a pair

    def __post_init__(self):
        if isinstance(self.image_size, int):
            self.image_size = (self.image_size, self.image_size)
        self.image_size = tuple(self.image_size)

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size[0] // self.patch_size

    @property
    def patch_dim(self) -> int:
        return self.channels * self.patch_size ** 2

    @property
    def inner_dim(self) -> int:
        return self.heads * self.dim_head

    @property
    def ff_inner_dim(self) -> int:
        """The release's gated feed-forward width, int(4 * 2/3 * dim)."""
        return int(4 * (2 / 3) * self.dim)

    @property
    def token_grid(self) -> tuple[int, int]:
        """The (rows, cols) map of code vectors NSVQ's convolutions leave."""
        rows = cols = self.grid
        for (kh, kw), stride, pad in DOWNSAMPLING.get(self.num_tokens, ()):
            rows = (rows + 2 * pad - kh) // stride + 1
            cols = (cols + 2 * pad - kw) // stride + 1
        return rows, cols

    @property
    def action_grid(self) -> tuple[int, int]:
        """How the release lays the tokens out for its decoder (a square, or 2x1)."""
        side = math.isqrt(self.num_tokens)
        return (side, side) if side * side == self.num_tokens else (2, 1)

    # ---- checks --------------------------------------------------------------------------
    def validate(self) -> "OfficialLAQConfig":
        """Raise ValueError naming the first inconsistent setting; return self when all is well."""
        if len(self.image_size) != 2 or self.image_size[0] != self.image_size[1]:
            raise ValueError(f"OfficialLAQConfig.image_size must be square, got {self.image_size!r}")
        for name in ("patch_size", "channels", "dim", "heads", "dim_head", "spatial_depth",
                     "temporal_depth", "code_dim", "codebook_size", "num_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"OfficialLAQConfig.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.image_size[0], int) or self.image_size[0] <= 0:
            raise ValueError(f"OfficialLAQConfig.image_size must be a positive integer, got {self.image_size!r}")
        if self.image_size[0] % self.patch_size:
            raise ValueError(f"OfficialLAQConfig.patch_size {self.patch_size} does not divide image_size "
                             f"{self.image_size[0]}")
        if self.num_tokens not in DOWNSAMPLING:
            raise ValueError(f"OfficialLAQConfig.num_tokens must be one of {sorted(DOWNSAMPLING)} (the release's "
                             f"NSVQ layouts), got {self.num_tokens}")
        rows, cols = self.token_grid
        if rows < 1 or cols < 1 or rows * cols != self.num_tokens:
            raise ValueError(f"OfficialLAQConfig: {self.num_tokens} tokens need another patch grid than "
                             f"{self.grid}x{self.grid} (image {self.image_size[0]} / patch {self.patch_size}); the "
                             f"release's layout leaves {max(rows, 0)}x{max(cols, 0)}")
        if self.codebook_size < 2:
            raise ValueError(f"OfficialLAQConfig.codebook_size must be at least 2, got {self.codebook_size}")
        if not self.window_s > 0:
            raise ValueError(f"OfficialLAQConfig.window_s must be positive, got {self.window_s}")
        return self

    # ---- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"model_type": MODEL_TYPE, **asdict(self), "image_size": list(self.image_size)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "OfficialLAQConfig":
        return cls(**dataclass_kwargs(cls, d, "OfficialLAQConfig keys", model_type=MODEL_TYPE)).validate()

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)
