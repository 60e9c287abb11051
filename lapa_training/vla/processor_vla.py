"""What turns a camera frame, an instruction and actions into VLA inputs and targets, and head
outputs back into actions.

- images: the shared preprocessing (lapa_training.image_processing: center crop, resize, the vision
  backbone's mean/std) at the vision encoder's size;
- instructions: prompt_template, then the tokenizer (right-padded, at most max_text_tokens);
- actions: ActionBins (lapa_training.vla.action_bins, fitted on the finetuning data) and the tables
  the action head reads from them (each bin's value, each dimension's unit and mean).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from lapa_training.image_processing import pixel_affine, preprocess_images
from lapa_training.vla.action_bins import ACTION_DIM, ActionBins
from lapa_training.vla.configuration_vla import VLAConfig


class VLAProcessor(nn.Module):
    """Images and instructions -> model inputs. A module only so that its normalisation constants
    follow the model's device and dtype; it has no weights and nothing in the state dict."""

    def __init__(self, tokenizer, image_size: tuple[int, int], image_mean: Sequence[float],
                 image_std: Sequence[float], prompt_template: str = "{instruction}", max_text_tokens: int = 64):
        super().__init__()
        self.tokenizer = tokenizer
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.prompt_template = prompt_template
        self.max_text_tokens = int(max_text_tokens)
        scale, shift = pixel_affine(image_mean, image_std)
        self.register_buffer("pixel_scale", scale, persistent=False)
        self.register_buffer("pixel_shift", shift, persistent=False)

    @classmethod
    def from_config(cls, config: VLAConfig, tokenizer, image_size: tuple[int, int]) -> "VLAProcessor":
        return cls(tokenizer, image_size, config.image_mean, config.image_std, config.prompt_template,
                   config.max_text_tokens)

    @property
    def device(self) -> torch.device:
        return self.pixel_scale.device

    def preprocess_images(self, images: np.ndarray | torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """uint8 RGB (B, H, W, 3) or (H, W, 3), numpy or torch -> normalised float (B, 3, h, w) at the
        vision encoder's size, on this processor's device (see lapa_training.image_processing)."""
        return preprocess_images(images, self.image_size, affine=(self.pixel_scale, self.pixel_shift),
                                 device=self.device, dtype=dtype)

    def prompts(self, instructions: Sequence[str]) -> list[str]:
        return [self.prompt_template.format(instruction=str(s).strip()) for s in instructions]

    def tokenize(self, instructions: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Instructions -> (input_ids, attention_mask), both (B, T) int64, right-padded, at most
        max_text_tokens long, on this processor's device."""
        if isinstance(instructions, str):
            instructions = [instructions]
        enc = self.tokenizer(self.prompts(instructions), padding=True, truncation=True,
                             max_length=self.max_text_tokens, return_tensors="pt")
        ids = enc["input_ids"].to(self.device, torch.long)
        mask = enc["attention_mask"].to(self.device, torch.long)
        return ids, mask


# ---------------------------------------------------------------------------------------------
# action bins -> what the action head reads
# ---------------------------------------------------------------------------------------------
def floored_spreads(bins: ActionBins, spread_floor: Sequence[float]) -> np.ndarray:
    """(7,) the unit each dimension's error is measured in: its spread in the training actions, at
    least spread_floor (translation, rotation) per step; the gripper's own."""
    translation, rotation = spread_floor
    floor = np.array([translation] * 3 + [rotation] * 3 + [0.0])
    return np.maximum(bins.spreads(), floor)


def action_bin_tables(bins: ActionBins, num_bins: int, spread_floor: Sequence[float]) -> dict[str, torch.Tensor]:
    """The action head's tables from fitted bins: bin_mask (7, num_bins) valid bins, bin_values
    (7, num_bins) each bin's value, bin_spread (7,) each dimension's unit, bin_center (7,) its mean,
    bin_continuous (7,) which dimensions are continuous. Raises when a dimension has more bins than
    num_bins."""
    if not isinstance(bins, ActionBins):
        raise TypeError(f"set_action_bins expects ActionBins, got {type(bins).__name__}")
    if bins.num_dims != ACTION_DIM:
        raise ValueError(f"action bins have {bins.num_dims} dimensions, the action head predicts {ACTION_DIM}")
    return {"bin_mask": torch.from_numpy(bins.valid_mask(num_bins)),
            "bin_values": torch.from_numpy(bins.value_table(num_bins)).float(),
            "bin_spread": torch.from_numpy(floored_spreads(bins, spread_floor)).float(),
            "bin_center": torch.from_numpy(bins.means()).float(),
            "bin_continuous": torch.from_numpy(bins.continuous_dims)}
