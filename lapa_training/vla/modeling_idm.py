"""Inverse-dynamics model (IDM) for the VPT baseline of the LAPA paper.

VPT (Baker et al. 2022) trains an IDM on the small action-labelled set, uses it to label the
action-free videos with pseudo-actions, and pretrains the VLA on those (VLAConfig objective "idm").

The IDM sees two frames, x_t and x_{t+H} (H = window_frames, 1 by default), and predicts the action
of the step from t to t+1 as one bin per action dimension (the same ActionBins as the VLA's action
head). Design: the two frames and their difference stacked as 9 channels -> a small strided CNN
(conv, then ``stages`` blocks of stride-2 conv + GroupNorm + GELU) -> adaptive average pool to a
4x4 grid -> MLP -> (7, num_bins) logits. Small on purpose: it only has to read motion between two
frames of one scene.

Checkpoints: model.safetensors + config.json (``model_type: "lapa_idm"``) + action_bins.json,
written by ``save_pretrained`` like the VLA's (lapa_training.checkpoint, no pickle).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lapa_training.dataclass_dict import dataclass_kwargs
from lapa_training.image_processing import preprocess_images
from lapa_training.vla.action_bins import ACTION_DIM, IGNORE_INDEX, ActionBins

MODEL_TYPE = "lapa_idm"
BINS_FILE = "action_bins.json"


@dataclass
class IDMConfig:
    image_size: int = 64  # frames are resized (center-cropped if not square) to image_size x image_size
    width: int = 16  # channels of the first conv; doubled by every stage
    stages: int = 3  # stride-2 stages (64 px -> 8 px with 3)
    hidden: int = 256  # MLP width
    num_bins: int = 256  # outputs per action dimension
    window_frames: int = 1  # H: the model reads x_t and x_{t+H} (metadata for labelling)
    dropout: float = 0.0

    def validate(self) -> "IDMConfig":
        for name in ("image_size", "width", "stages", "hidden", "window_frames"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"IDMConfig.{name} must be a positive integer, got {v!r}")
        if not isinstance(self.num_bins, int) or self.num_bins < 2:
            raise ValueError(f"IDMConfig.num_bins must be an integer >= 2, got {self.num_bins!r}")
        if self.image_size % (2 ** self.stages):
            raise ValueError(f"IDMConfig.image_size {self.image_size} must be divisible by 2**stages = "
                             f"{2 ** self.stages}; change image_size or stages")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"IDMConfig.dropout must be in [0, 1), got {self.dropout}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": MODEL_TYPE, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "IDMConfig":
        return cls(**dataclass_kwargs(cls, d, "IDMConfig keys", model_type=MODEL_TYPE)).validate()

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


@dataclass
class IDMOutput:
    logits: torch.Tensor  # (B, 7, num_bins), invalid bins at dtype min
    predictions: torch.Tensor  # (B, 7) bin ids
    loss: torch.Tensor | None = None
    accuracy: torch.Tensor | None = None


class IDMModel(nn.Module):
    def __init__(self, config: IDMConfig, action_bins: ActionBins | None = None):
        super().__init__()
        self.config = config.validate()
        w = config.width
        layers: list[nn.Module] = [nn.Conv2d(9, w, 3, padding=1), nn.GELU()]
        for i in range(config.stages):
            c_in, c_out = w * 2 ** i, w * 2 ** (i + 1)
            layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.GroupNorm(8 if c_out % 8 == 0 else 1, c_out),
                       nn.GELU()]
        self.encoder = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(4), nn.Flatten())
        c = w * 2 ** config.stages * 16
        self.head = nn.Sequential(nn.Linear(c, config.hidden), nn.GELU(), nn.Dropout(config.dropout),
                                  nn.Linear(config.hidden, ACTION_DIM * config.num_bins))
        self.register_buffer("bin_mask", torch.ones(ACTION_DIM, config.num_bins, dtype=torch.bool), persistent=False)
        self.action_bins: ActionBins | None = None
        if action_bins is not None:
            self.set_action_bins(action_bins)

    @property
    def device(self) -> torch.device:
        return self.head[0].weight.device

    def set_action_bins(self, bins: ActionBins) -> None:
        if bins.num_dims != ACTION_DIM:
            raise ValueError(f"action bins have {bins.num_dims} dimensions, the IDM predicts {ACTION_DIM}")
        self.bin_mask = torch.from_numpy(bins.valid_mask(self.config.num_bins)).to(self.bin_mask.device)
        self.action_bins = bins

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def preprocess(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 RGB (B, H, W, 3) -> float (B, 3, S, S) in [-1, 1] (center crop + resize when needed)."""
        x = preprocess_images(frames, self.config.image_size, device=self.device, what="frames")
        return x.contiguous(memory_format=torch.channels_last)  # the layout its convolutions were trained in

    def forward(self, x_t: torch.Tensor, x_next: torch.Tensor, labels: torch.Tensor | None = None) -> IDMOutput:
        """x_t, x_next: (B, 3, S, S) from preprocess; labels (B, 7) bin ids (IGNORE_INDEX skipped)."""
        size = self.config.image_size
        for name, x in (("x_t", x_t), ("x_next", x_next)):
            if x.ndim != 4 or tuple(x.shape[1:]) != (3, size, size):
                raise ValueError(f"{name} must be (B, 3, {size}, {size}) (use preprocess), got {tuple(x.shape)}")
        z = self.encoder(torch.cat([x_t, x_next, x_next - x_t], dim=1))
        logits = self.head(z).view(-1, ACTION_DIM, self.config.num_bins)
        if not bool(self.bin_mask.all()):
            logits = logits.masked_fill(~self.bin_mask, torch.finfo(logits.dtype).min)
        out = IDMOutput(logits=logits, predictions=logits.argmax(-1))
        if labels is not None:
            labels = torch.as_tensor(labels, device=logits.device).long()
            if labels.shape != out.predictions.shape:
                raise ValueError(f"labels must be (B, 7) bin ids, got {tuple(labels.shape)}")
            valid = labels != IGNORE_INDEX
            n = valid.sum()
            if int(n) == 0:
                out.loss, out.accuracy = (logits * 0.0).sum(), torch.zeros((), device=logits.device)
            else:
                out.loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                           ignore_index=IGNORE_INDEX)
                out.accuracy = ((out.predictions == labels) & valid).sum().float() / n
        return out

    @torch.inference_mode()
    def label(self, frames_t: np.ndarray, frames_next: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pseudo-actions for frame pairs (uint8 (B, H, W, 3) each) -> (bin ids (B, 7), actions (B, 7))."""
        if self.action_bins is None:
            raise RuntimeError("this IDM has no action bins (set_action_bins): cannot turn bins into actions")
        ids = self.forward(self.preprocess(frames_t), self.preprocess(frames_next)).predictions.cpu().numpy()
        return ids, self.action_bins.decode(ids)

    # ---- persistence ---------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, *, optimizer=None, scheduler=None, step: int = 0,
                        extra: dict | None = None) -> Path:
        from lapa_training.checkpoint import save_checkpoint

        def write_files(dest: Path) -> None:
            if self.action_bins is not None:
                self.action_bins.save(dest / BINS_FILE)

        return save_checkpoint(directory, self, self.config.to_dict(), optimizer=optimizer, scheduler=scheduler,
                               step=step, extra=extra, write_files=write_files)

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> "IDMModel":
        from lapa_training.checkpoint import CheckpointError, load_checkpoint, load_model_state, resolve_checkpoint

        state, saved, _ = load_checkpoint(directory, device=str(map_location))
        path = resolve_checkpoint(directory)
        try:
            config = IDMConfig.from_dict(saved)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"checkpoint {path} does not hold a valid IDM config: {e}") from e
        bins = ActionBins.load(path / BINS_FILE) if (path / BINS_FILE).is_file() else None
        model = cls(config, action_bins=bins)
        load_model_state(model, state, source=path)
        return model.to(map_location)
