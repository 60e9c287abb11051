"""The built-in tiny vision tower: a small CNN with coordinate channels (CPU demo and tests).

    image (B, 3, S, S) + x/y coordinate planes -> conv 5x5/2 -> conv 3x3/2 -> conv 3x3/2 -> conv 3x3/1
        -> average-pooled to a grid x grid map -> (B, grid*grid, hidden_size) tokens, row-major

Optionally FiLM-conditioned (``film``: per-sample scales and shifts of every conv layer's output,
as RT-1's FiLM-EfficientNet): the VLA computes them from the instruction (VLAConfig.vision_film),
so the tower can look for what the instruction names.

It plays the part of the paper's vision encoder at a size 2 CPU cores train in minutes. It is a
CNN, not a tiny ViT, because a tiny ViT trained from scratch learnt far less at this scale
(docs/DECISIONS.md): convolutions share weights over positions and the coordinate planes say
where each feature is, which a from-scratch ViT has to learn from data.

It is a transformers ``PreTrainedModel`` registered with ``AutoConfig``/``AutoModel`` under
MODEL_TYPE, so a VLA checkpoint that contains it is rebuilt from its saved config like any
other backbone, without a download and without this module's name in the checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput

MODEL_TYPE = "lapa_tiny_conv_vision"


class TinyConvVisionConfig(PretrainedConfig):
    model_type = MODEL_TYPE

    def __init__(self, image_size: int = 64, hidden_size: int = 64, channels=(32, 64, 64), grid: int = 8,
                 num_channels: int = 3, **kwargs):
        kwargs.pop("patch_size", None)  # derived below; accepted so configs that carry it load
        super().__init__(**kwargs)
        if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < grid or image_size % grid:
            raise ValueError(f"tiny vision tower: image_size must be a multiple of grid {grid}, got {image_size!r}")
        if len(channels) != 3 or not all(isinstance(c, int) and c > 0 for c in channels):
            raise ValueError(f"tiny vision tower: channels must be 3 positive integers, got {channels!r}")
        self.image_size, self.hidden_size, self.grid = image_size, int(hidden_size), int(grid)
        self.channels, self.num_channels = [int(c) for c in channels], int(num_channels)
        # the image side one output token covers, as a ViT's patch_size (sequence-length checks read it)
        self.patch_size = image_size // grid


class TinyConvVisionModel(PreTrainedModel):
    config_class = TinyConvVisionConfig
    main_input_name = "pixel_values"
    base_model_prefix = "tiny_conv_vision"

    def __init__(self, config: TinyConvVisionConfig):
        super().__init__(config)
        c1, c2, c3 = config.channels
        self.convs = nn.Sequential(
            nn.Conv2d(config.num_channels + 2, c1, 5, stride=2, padding=2), nn.GELU(),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(c2, c3, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(c3, config.hidden_size, 3, stride=1, padding=1))
        self.pool = nn.AdaptiveAvgPool2d(config.grid)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Conv2d):
            module.reset_parameters()  # PyTorch's default (Kaiming-uniform), what was measured

    @property
    def film_channels(self) -> list[int]:
        """Output channels of each conv layer: a FiLM vector holds a scale and a shift for each."""
        return [*self.config.channels, self.config.hidden_size]

    def forward(self, pixel_values: torch.Tensor, film: torch.Tensor | None = None, **kwargs) -> BaseModelOutput:
        """film (optional): (B, 2 * sum(film_channels)) per layer [scale; shift], applied to each conv's
        output as x * (1 + scale) + shift, before its activation."""
        b, _, h, w = pixel_values.shape
        ys = torch.linspace(-1.0, 1.0, h, device=pixel_values.device, dtype=pixel_values.dtype)
        xs = torch.linspace(-1.0, 1.0, w, device=pixel_values.device, dtype=pixel_values.dtype)
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        coords = torch.stack([xx, yy]).expand(b, 2, h, w)
        x = torch.cat([pixel_values, coords], dim=1)
        layers = iter(()) if film is None else iter(film.to(x.dtype).split([2 * c for c in self.film_channels], 1))
        for module in self.convs:
            x = module(x)
            if film is not None and isinstance(module, nn.Conv2d):  # FiLM between each conv and its activation
                scale, shift = next(layers)[:, :, None, None].chunk(2, dim=1)
                x = x * (1 + scale) + shift
        features = self.pool(x)
        return BaseModelOutput(last_hidden_state=features.flatten(2).transpose(1, 2))


AutoConfig.register(MODEL_TYPE, TinyConvVisionConfig, exist_ok=True)
AutoModel.register(TinyConvVisionConfig, TinyConvVisionModel, exist_ok=True)
