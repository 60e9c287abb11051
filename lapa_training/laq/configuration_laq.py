"""Configuration of the LAQ model (Latent Action Quantization, stage 1 of LAPA).

One frozen-shape dataclass, JSON round-trippable, checked by ``validate()`` with messages that say
what to change. Two presets: ``tiny()`` (64x64 frames, trains in minutes on a laptop CPU) and
``paper()`` (the LAPA paper's 256x256 model); ``small()`` sits in between (128x128, the size the
simulator's datasets store).

Shapes, for a config with image (H, W) and patch p:
  patch grid  (gh, gw) = (H / p, W / p), N = gh * gw patch tokens per frame
  action grid (ah, aw) = action_grid, L = ah * aw latent-action tokens per frame pair
  each action token covers a (gh / ah) x (gw / aw) block of patches, so ah must divide gh and aw gw.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any
from lapa_training.dataclass_dict import dataclass_kwargs

MODEL_TYPE = "laq"
CONDITIONINGS = ("cross_attention", "additive")

# Dead-code replacement: (every, until) pairs. Replace at every `every`-th training step while the
# step is <= `until`, using the first pair whose `until` has not passed; never after the last one.
DEFAULT_REPLACE_SCHEDULE: tuple[tuple[int, int], ...] = ((10, 100), (100, 1000), (500, 5000))

# Keys that change how a model trains but not its weights: a checkpoint may be loaded into a config
# that differs only in these.
TRAINING_ONLY_KEYS = ("dropout", "replace_schedule")


@dataclass
class LAQConfig:
    image_size: tuple[int, int] = (64, 64)  # (H, W); an int in the constructor or JSON means square
    patch_size: int = 8
    channels: int = 3
    dim: int = 128  # transformer width D
    heads: int = 4
    spatial_depth: int = 2  # encoder blocks attending within each frame
    temporal_depth: int = 2  # encoder blocks attending across the 2 frames (causal)
    decoder_depth: int = 2
    mlp_ratio: float = 4.0
    code_dim: int = 32  # width of the quantized latent vectors
    codebook_size: int = 8  # |C|
    action_grid: tuple[int, int] = (2, 2)  # L = ah * aw latent-action tokens
    conditioning: str = "cross_attention"  # how the decoder reads the latent action
    dropout: float = 0.0
    window_s: float = 0.6  # metadata: seconds between x_t and x_{t+H} the model was trained for
    replace_schedule: tuple[tuple[int, int], ...] = field(default=DEFAULT_REPLACE_SCHEDULE)

    def __post_init__(self):
        if isinstance(self.image_size, int):
            self.image_size = (self.image_size, self.image_size)
        self.image_size = tuple(self.image_size)
        self.action_grid = tuple(self.action_grid)
        self.replace_schedule = tuple(tuple(p) for p in self.replace_schedule)

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def patch_grid(self) -> tuple[int, int]:
        return self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size

    @property
    def num_patches(self) -> int:
        gh, gw = self.patch_grid
        return gh * gw

    @property
    def num_tokens(self) -> int:
        """L, the number of latent-action tokens per frame pair."""
        return self.action_grid[0] * self.action_grid[1]

    @property
    def pool_block(self) -> tuple[int, int]:
        """How many patches (rows, cols) one latent-action token summarises."""
        (gh, gw), (ah, aw) = self.patch_grid, self.action_grid
        return gh // ah, gw // aw

    def is_replacement_step(self, step: int) -> bool:
        """Whether dead codes are re-initialised at training step `step` (1-based)."""
        for every, until in self.replace_schedule:
            if step <= until:
                return step > 0 and step % every == 0
        return False

    # ---- checks --------------------------------------------------------------------------
    def validate(self) -> "LAQConfig":
        """Raise ValueError naming the first inconsistent setting; return self when all is well."""
        def positive_int(name, value):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"LAQConfig.{name} must be a positive integer, got {value!r}")

        if len(self.image_size) != 2:
            raise ValueError(f"LAQConfig.image_size must be an int or (height, width), got {self.image_size!r}")
        for name, value in (("image_size[0]", self.image_size[0]), ("image_size[1]", self.image_size[1]),
                            ("patch_size", self.patch_size), ("channels", self.channels), ("dim", self.dim),
                            ("heads", self.heads), ("spatial_depth", self.spatial_depth),
                            ("decoder_depth", self.decoder_depth), ("code_dim", self.code_dim),
                            ("codebook_size", self.codebook_size)):
            positive_int(name, value)
        if not isinstance(self.temporal_depth, int) or self.temporal_depth < 1:
            raise ValueError(f"LAQConfig.temporal_depth must be >= 1 (the temporal blocks are what let e2 "
                             f"see both frames), got {self.temporal_depth!r}")
        h, w = self.image_size
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"LAQConfig.patch_size {self.patch_size} does not divide image_size {h}x{w}; "
                             f"pick a patch size that divides both sides")
        if self.dim % self.heads:
            raise ValueError(f"LAQConfig.dim {self.dim} is not divisible by heads {self.heads} "
                             f"(each head gets dim / heads channels)")
        if len(self.action_grid) != 2:
            raise ValueError(f"LAQConfig.action_grid must be (rows, cols), got {self.action_grid!r}")
        for i, value in enumerate(self.action_grid):
            positive_int(f"action_grid[{i}]", value)
        (gh, gw), (ah, aw) = self.patch_grid, self.action_grid
        if gh % ah or gw % aw:
            raise ValueError(f"LAQConfig.action_grid {ah}x{aw} (L = {ah * aw} tokens) does not evenly reduce the "
                             f"patch grid {gh}x{gw} (image {h}x{w} / patch {self.patch_size}); every grid side "
                             f"must divide the patch grid side, e.g. action_grid "
                             f"{_divisor_hint(gh, ah)}x{_divisor_hint(gw, aw)}")
        if self.codebook_size < 2:
            raise ValueError(f"LAQConfig.codebook_size must be at least 2, got {self.codebook_size}")
        if self.conditioning not in CONDITIONINGS:
            raise ValueError(f"LAQConfig.conditioning must be one of {', '.join(CONDITIONINGS)}, "
                             f"got {self.conditioning!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LAQConfig.dropout must be in [0, 1), got {self.dropout}")
        if not self.mlp_ratio > 0:
            raise ValueError(f"LAQConfig.mlp_ratio must be positive, got {self.mlp_ratio}")
        if not self.window_s > 0:
            raise ValueError(f"LAQConfig.window_s must be positive (seconds between the two frames), "
                             f"got {self.window_s}")
        last_until = 0
        for pair in self.replace_schedule:
            if len(pair) != 2 or not all(isinstance(v, int) and v > 0 for v in pair):
                raise ValueError(f"LAQConfig.replace_schedule entries must be (every, until) positive integers, "
                                 f"got {pair!r}")
            if pair[1] <= last_until:
                raise ValueError(f"LAQConfig.replace_schedule 'until' steps must increase, got "
                                 f"{list(self.replace_schedule)!r}")
            last_until = pair[1]
        return self

    # ---- presets -------------------------------------------------------------------------
    @classmethod
    def tiny(cls, **overrides) -> "LAQConfig":
        """64x64 frames, 8x8 patches, width 128: trains in minutes on 2 CPU cores."""
        return cls(**{**dict(image_size=(64, 64), patch_size=8, dim=128, heads=4, spatial_depth=2,
                             temporal_depth=2, decoder_depth=2, code_dim=32, codebook_size=8,
                             action_grid=(2, 2)), **overrides})

    @classmethod
    def small(cls, **overrides) -> "LAQConfig":
        """128x128 frames (the simulator datasets' size), 16x16 patches, width 256: a GPU-hour model."""
        return cls(**{**dict(image_size=(128, 128), patch_size=16, dim=256, heads=8, spatial_depth=4,
                             temporal_depth=4, decoder_depth=4, code_dim=32, codebook_size=8,
                             action_grid=(2, 2)), **overrides})

    @classmethod
    def paper(cls, **overrides) -> "LAQConfig":
        """The LAPA paper's LAQ: 256x256, patch 32 (8x8 grid), width 1024, 16 heads, 8+8 encoder and
        8 decoder blocks, code dim 32, 2x2 = 4 tokens from a codebook of 8."""
        return cls(**{**dict(image_size=(256, 256), patch_size=32, dim=1024, heads=16, spatial_depth=8,
                             temporal_depth=8, decoder_depth=8, code_dim=32, codebook_size=8,
                             action_grid=(2, 2)), **overrides})

    # ---- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["image_size"] = list(self.image_size)
        d["action_grid"] = list(self.action_grid)
        d["replace_schedule"] = [list(p) for p in self.replace_schedule]
        return {"model_type": MODEL_TYPE, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LAQConfig":
        return cls(**dataclass_kwargs(cls, d, "LAQConfig keys", model_type=MODEL_TYPE)).validate()

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "LAQConfig":
        return cls.from_dict(json.loads(text))


def _divisor_hint(grid: int, wanted: int) -> int:
    """The divisor of `grid` closest to `wanted` (for the error message)."""
    return min((d for d in range(1, grid + 1) if grid % d == 0), key=lambda d: (abs(d - wanted), d))
