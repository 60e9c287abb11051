"""Camera frames into model inputs: the one image preprocessing the VLA, the LAQ and the IDM share.

    uint8 RGB (H, W, 3) or (B, H, W, 3), numpy or torch
        ─ center-crop to the target's aspect ratio (as dataset ingest does)
        ─ resize (area averaging when shrinking, bilinear when growing)
        ─ normalise: to [-1, 1], or with a vision backbone's per-channel mean and std
        → float (B, 3, h, w), contiguous

Training, labelling, evaluation and the policy all read pixels through here, so a model sees at
run time exactly what it saw in training.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["preprocess_images", "pixel_affine"]


def pixel_affine(mean: Sequence[float], std: Sequence[float],
                 device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), each (1, 3, 1, 1) float32: uint8 value x -> x * scale - shift = (x / 255 - mean) / std."""
    std_t = torch.tensor(tuple(float(v) for v in std))
    scale = (1.0 / (255.0 * std_t)).view(1, 3, 1, 1)
    shift = (torch.tensor(tuple(float(v) for v in mean)) / std_t).view(1, 3, 1, 1)
    return scale.to(device), shift.to(device)


def preprocess_images(images: np.ndarray | torch.Tensor, size: int | Sequence[int] | None = None, *,
                      mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                      affine: tuple[torch.Tensor, torch.Tensor] | None = None,
                      device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                      what: str = "images") -> torch.Tensor:
    """uint8 RGB (B, H, W, 3) or (H, W, 3), numpy or torch -> normalised float (B, 3, h, w).

    size: (h, w) or one int for a square; None keeps the frames' own size. Frames of another aspect
    ratio are center-cropped to the target's first, then resized.
    mean/std: per-channel statistics of a vision backbone (x / 255 - mean) / std; `affine` is the
    same as precomputed (scale, shift) from pixel_affine. Neither: [-1, 1] (x / 127.5 - 1).
    dtype: cast at the end (a half-precision vision tower); default float32."""
    if torch.is_tensor(images):
        x = images
    else:
        a = np.asarray(images)
        # a read-only np.memmap of a dataset: torch wants its own copy
        x = torch.from_numpy(np.array(a) if not a.flags.writeable else np.ascontiguousarray(a))
    if x.dtype != torch.uint8:
        raise ValueError(f"{what} must be uint8 RGB (H, W, 3) or (B, H, W, 3), got dtype {x.dtype}")
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3 or x.shape[1] == 0 or x.shape[2] == 0:
        raise ValueError(f"{what} must be uint8 RGB (H, W, 3) or (B, H, W, 3), got shape {tuple(x.shape)}")
    x = x.to(device, non_blocking=True) if device is not None else x
    x = x.permute(0, 3, 1, 2).float()
    if size is not None:
        target = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
        x = _center_crop_to_aspect(x, target)
        if tuple(x.shape[-2:]) != target:
            shrink = x.shape[-2] >= target[0]
            x = F.interpolate(x, size=target, mode="area" if shrink else "bilinear",
                              **({} if shrink else {"align_corners": False}))
    if affine is None and mean is not None and std is not None:
        affine = pixel_affine(mean, std, x.device)
    if affine is not None:
        scale, shift = affine
        x = x * scale.to(x.device) - shift.to(x.device)
    else:
        x = x / 127.5 - 1.0
    x = x.contiguous()
    return x if dtype is None else x.to(dtype)


def _center_crop_to_aspect(x: torch.Tensor, target: tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) -> the largest centred crop with the aspect ratio of `target` (h, w)."""
    h, w = x.shape[-2:]
    th, tw = target
    if h * tw == w * th:
        return x
    if h * tw > w * th:  # too tall
        new_h = w * th // tw
        top = (h - new_h) // 2
        return x[:, :, top:top + new_h]
    new_w = h * tw // th
    left = (w - new_w) // 2
    return x[:, :, :, left:left + new_w]
