"""A finetuned VLA as a policy for the policy server (lapa_core.policy.Policy).

    policy = VLAPolicy.from_pretrained("runs/finetune/checkpoint")   # or lapa_core.policy.load_policy(dir)
    policy.reset("pick up the red block")
    step = policy.act(rgb_uint8_hxwx3, "pick up the red block")       # PolicyStep(delta (7,), tokens, "action")

With action chunking (chunk_size k > 1) one inference predicts k steps; ``act`` hands them out one
per call and only runs the model again when they are used up (``reset`` or a new instruction
empties the queue). ``act_chunk`` always runs the model and returns all k steps.

Runtime imports only torch, transformers, numpy, the VLA model modules and the checkpoint reader:
no training code.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path

import numpy as np
import torch

from lapa_core.policy import PolicyLoadError, PolicyStep
from lapa_training.vla.modeling_vla import VLAModel


class VLAPolicy:
    def __init__(self, model: VLAModel, source: str = "model"):
        if model.action_head is None:
            raise PolicyLoadError(f"{source} is a latent-action pretrained VLA (objective "
                                  f"{model.config.objective!r}, stage {model.config.stage!r}) that predicts latent "
                                  f"actions, not robot actions: finetune it first on action-labelled data, then "
                                  f"load the finetuned checkpoint")
        if model.action_bins is None:
            raise PolicyLoadError(f"{source} has an action head but no action bins (action_bins.json): it cannot "
                                  f"turn its predictions into actions; save it after model.set_action_bins(bins)")
        self.model = model.eval()
        self.source = source
        self.control_rate = float(model.config.control_rate)
        self.chunk_size = int(model.config.chunk_size)
        self._queue: deque[tuple[np.ndarray, list[int]]] = deque()
        self._instruction: str | None = None
        self._tokens: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> "VLAPolicy":
        """Load a finetuned VLA checkpoint; every failure is a PolicyLoadError naming the checkpoint."""
        try:
            model = VLAModel.from_pretrained(path, map_location=device)
        except PolicyLoadError:
            raise
        except Exception as e:  # CheckpointError, VLABuildError, transformers errors
            raise PolicyLoadError(f"cannot load VLA checkpoint {path}: {e}") from e
        return cls(model, source=str(path))

    # ---- Policy protocol -----------------------------------------------------------------
    def reset(self, instruction: str) -> None:
        """Start an episode: forget queued chunk steps; tokenize the instruction once (a VLM's processor
        tokenizes it with each image)."""
        self._queue.clear()
        self._take(instruction)

    def act(self, image: np.ndarray, instruction: str) -> PolicyStep:
        """One control step: the (7,) end-effector delta for `image` (H, W, 3) uint8 RGB."""
        if instruction != self._instruction:
            self._queue.clear()
            self._take(instruction)
        if not self._queue:
            ids, actions = self._infer(image, instruction)
            for k in range(len(actions)):
                self._queue.append((actions[k], ids[k].tolist()))
        else:
            _check_image(image)
        delta, tokens = self._queue.popleft()
        return PolicyStep(delta=delta.astype(np.float64), tokens=tokens, token_kind="action")

    def act_chunk(self, image: np.ndarray, instruction: str) -> np.ndarray:
        """Run the model now and return all chunk_size predicted steps (k, 7) (the queue is untouched)."""
        return self._infer(image, instruction)[1].astype(np.float64)

    # ---- internals -----------------------------------------------------------------------
    def _take(self, instruction: str) -> None:
        """Check and record a new instruction; the composed path tokenizes it once here (a VLM's
        processor reads it with each image)."""
        if self.model.vlm is None:
            self._tokenized(instruction)
        elif not isinstance(instruction, str):
            raise TypeError(f"instruction must be a string, got {type(instruction).__name__}")
        else:
            self._instruction = instruction

    def _tokenized(self, instruction: str) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(instruction, str):
            raise TypeError(f"instruction must be a string, got {type(instruction).__name__}")
        if instruction != self._instruction or self._tokens is None:
            self._tokens = self.model.tokenize([instruction])
            self._instruction = instruction
        return self._tokens

    @torch.inference_mode()
    def _infer(self, image: np.ndarray, instruction: str) -> tuple[np.ndarray, np.ndarray]:
        """-> (bin ids (k, 7), actions (k, 7)) for one image."""
        _check_image(image)
        if self.model.vlm is not None:  # its processor reads image and prompt together
            ids, actions = self.model.predict_actions(**self.model.prepare_inputs(image[None], [instruction]))
        else:
            input_ids, attention_mask = self._tokenized(instruction)
            pixels = self.model.preprocess_images(image)
            ids, actions = self.model.predict_actions(pixels, input_ids, attention_mask)
        if not np.isfinite(actions).all():
            raise RuntimeError(f"VLA policy {self.source} produced non-finite actions {actions[0]}")
        return ids[0], actions[0]


def _check_image(image) -> None:
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be a numpy array (H, W, 3) uint8 RGB, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 RGB (H, W, 3), got dtype {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image must be (H, W, 3) uint8 RGB, got shape {image.shape}")


def load_vla_policy(path: Path, config: dict) -> VLAPolicy:
    """The loader lapa_core.policy.load_policy uses for policy_type "lapa_vla" (entry point in setup.py)."""
    return VLAPolicy.from_pretrained(path)
