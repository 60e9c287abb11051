"""A pretrained vision-language model as the VLA's backbone (``VLAConfig.backbone``): loaded with
transformers' AutoModelForImageTextToText and AutoProcessor, so each family runs with its own vision
tower, connector, language model, image preprocessing and prompt format.

    images (B, H, W, 3) uint8 + instructions ─ the VLM's processor (its chat template, or its own
        prompt format where it has none) ─ input_ids with the image tokens, pixel_values, ...
    ─ the VLM without its LM head ─ final hidden state at each row's last real token (B, D) ─ the heads

FAMILIES names, per model_type, where the vision tower, the connector and the language model sit;
the vision tower is frozen by default (as in the paper), the connector and the language model train,
or, with lora_rank > 0, LoRA adapters on the language model's projections (peft) instead of its weights.
A checkpoint keeps the VLM's config and the processor's files (processor/), so loading it needs no network.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from lapa_training.vla.backbones import VLABuildError, local_or_id

PROCESSOR_DIR = "processor"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Family:
    vision: str  # module path of the vision tower in the VLM (without its LM head)
    connector: str  # module path of what maps vision features into the LM's embedding space
    language: str  # module path of the language model


FAMILIES: dict[str, Family] = {
    "idefics3": Family("vision_model", "connector", "text_model"),  # SmolVLM
    "smolvlm": Family("vision_model", "connector", "text_model"),  # SmolVLM2 (SmolVLA's backbone)
    "paligemma": Family("vision_tower", "multi_modal_projector", "language_model"),
    "qwen2_5_vl": Family("visual", "visual.merger", "language_model"),  # the merger sits inside `visual`
}


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


class VLMBackbone(nn.Module):
    """The VLM (no LM head) and its processor. ``inputs`` turns images and instructions into model
    inputs; ``final_hidden`` runs the VLM and reads the state at each row's last real token."""

    def __init__(self, model: nn.Module, processor, source: str, lora: dict[str, Any] | None = None):
        super().__init__()
        model_type = getattr(model.config, "model_type", None)
        if model_type not in FAMILIES:
            raise VLABuildError(f"backbone {source!r} is a {model_type!r} model; supported VLM families: "
                                f"{', '.join(sorted(FAMILIES))}")
        self.model = model
        self.processor = processor
        self.family = FAMILIES[model_type]
        self.source = source
        processor.tokenizer.padding_side = "right"  # the last real token of each row is its length - 1
        self._prompts: dict[tuple[str, str], str] = {}  # (template, instruction) -> prompt: one render each
        self.lora = dict(lora or {})
        if self.lora.get("rank", 0) > 0:
            self._add_lora(**self.lora)

    # ---- building --------------------------------------------------------------------------
    @classmethod
    def load(cls, name: str, processor_overrides: dict[str, Any] | None = None,
             lora: dict[str, Any] | None = None) -> "VLMBackbone":
        """A hub id or directory of an image-text-to-text VLM, in float32 (train with autocast, or cast)."""
        from transformers import AutoConfig, AutoModelForImageTextToText

        where = local_or_id(name)
        try:
            config = AutoConfig.from_pretrained(where)
        except Exception as e:
            raise VLABuildError(f"cannot load VLM backbone {name!r}: {e}") from e
        if config.model_type not in FAMILIES:
            raise VLABuildError(f"backbone {name!r} is a {config.model_type!r} model; supported VLM families: "
                                f"{', '.join(sorted(FAMILIES))} (or set vision_backbone and language_backbone)")
        processor = load_processor(where, processor_overrides, config.model_type)
        try:
            full = AutoModelForImageTextToText.from_pretrained(where, dtype=torch.float32)
        except Exception as e:
            raise VLABuildError(f"cannot load VLM backbone {name!r}: {e}") from e
        return cls(full.model, processor, name, lora)  # the LM head is not kept

    @classmethod
    def from_saved(cls, config_dict: dict[str, Any], processor_dir: Path, source: str,
                   lora: dict[str, Any] | None = None) -> "VLMBackbone":
        """Rebuild from a checkpoint's saved VLM config (random weights, to be loaded) and processor files."""
        from transformers import AutoConfig, AutoModel

        d = dict(config_dict)
        try:
            config = AutoConfig.for_model(d.pop("model_type"), **d)
            model = AutoModel.from_config(config, dtype=torch.float32)  # the base model: no LM head
        except Exception as e:
            raise VLABuildError(f"cannot rebuild the VLM backbone of {source} from its saved config: {e}") from e
        return cls(model, load_processor(str(processor_dir), model_type=config.model_type), source, lora)

    def _add_lora(self, rank: int, alpha: float, dropout: float) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        pattern = rf"^{self.family.language}\..*\.({'|'.join(LORA_TARGETS)})$"
        try:
            inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                                               target_modules=pattern), self.model)
        except ValueError as e:  # peft: no target module found
            raise VLABuildError(f"backbone {self.source!r}: cannot add LoRA to its language model: {e}") from e
        if not any("lora_" in n for n, _ in self.model.named_parameters()):
            raise VLABuildError(f"backbone {self.source!r}: no LoRA target ({', '.join(LORA_TARGETS)}) in its "
                                f"language model")

    # ---- parts -----------------------------------------------------------------------------
    def part(self, name: str) -> str:
        """'vision', 'connector', 'language' or 'lora' for a parameter name of self.model."""
        if "lora_" in name:
            return "lora"
        if _under(name, self.family.connector):
            return "connector"
        if _under(name, self.family.vision):
            return "vision"
        if _under(name, self.family.language):
            return "language"
        return "connector"  # e.g. embeddings of special tokens some families keep beside the LM

    def set_trainable(self, *, vision: bool, language: bool) -> None:
        """Vision tower and language model as asked; the connector always trains; with LoRA the language
        model's own weights stay fixed and its adapters train."""
        lora = bool(self.lora.get("rank", 0))
        for name, p in self.model.named_parameters():
            part = self.part(name)
            p.requires_grad_({"vision": vision, "language": language and not lora, "connector": True,
                              "lora": language}[part])

    def vision_modules(self) -> list[nn.Module]:
        """The vision tower's modules (without the connector), for eval mode while frozen."""
        vision = self.model.get_submodule(self.family.vision)
        if _under(self.family.connector, self.family.vision):
            connector = self.model.get_submodule(self.family.connector)
            return [m for m in vision.children() if m is not connector]
        return [vision]

    def parameter_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for name, p in self.model.named_parameters():
            key = f"vlm_{self.part(name)}"
            counts[key] = counts.get(key, 0) + p.numel()
        return counts

    @property
    def hidden_size(self) -> int:
        return int(self.model.get_input_embeddings().embedding_dim)

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    # ---- inputs and forward ----------------------------------------------------------------
    def prompts(self, instructions: Sequence[str], template: str) -> list[str]:
        """Each instruction in `template`, inside the VLM's chat format with one image before it (its
        processor's own prompt format where it has no chat template, e.g. PaliGemma)."""
        return [self._prompt(template, str(s)) for s in instructions]

    def _prompt(self, template: str, instruction: str) -> str:
        key = (template, instruction)
        if key not in self._prompts:  # the control loop asks for the same instruction at every step
            if len(self._prompts) >= 4096:  # a training corpus has many: keep the cache bounded
                self._prompts.clear()
            text = template.format(instruction=instruction.strip())
            if getattr(self.processor, "chat_template", None):
                self._prompts[key] = self.processor.apply_chat_template(
                    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}],
                    add_generation_prompt=True, tokenize=False)
            else:
                self._prompts[key] = (getattr(self.processor, "image_token", None) or "<image>") + text
        return self._prompts[key]

    def inputs(self, images: np.ndarray | torch.Tensor, instructions: Sequence[str], template: str,
               device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """uint8 RGB (B, H, W, 3) and B instructions -> the VLM's inputs (right-padded), on `device`."""
        frames = images.cpu().numpy() if torch.is_tensor(images) else np.asarray(images)
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"images must be uint8 RGB (B, H, W, 3), got {frames.dtype} {frames.shape}")
        if len(frames) != len(instructions):
            raise ValueError(f"{len(frames)} images but {len(instructions)} instructions")
        enc = self.processor(text=self.prompts(instructions, template), images=[[f] for f in frames],
                             return_tensors="pt", padding=True)
        out = {}
        for key, value in enc.items():
            if key == "labels" or not torch.is_tensor(value):  # PaliGemma's LM labels: the heads have their own
                continue
            out[key] = value.to(device, dtype=dtype if value.is_floating_point() else None)
        return out

    def final_hidden(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The language model's final hidden state at each row's last real token (B, D)."""
        hidden = self.model(**inputs, use_cache=False).last_hidden_state
        mask = inputs["attention_mask"]
        last = (mask.sum(1) - 1).clamp(min=0)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]

    # ---- persistence -----------------------------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        d = self.model.config.to_dict()
        d.pop("_name_or_path", None)
        return json.loads(json.dumps(d, default=str))

    def save_processor(self, directory: Path) -> None:
        self.processor.save_pretrained(str(directory / PROCESSOR_DIR))


def load_processor(where: str, overrides: dict[str, Any] | None = None, model_type: str | None = None):
    """The VLM's AutoProcessor. Qwen2.5-VL's and SmolVLM2's are built with their video halves, which
    transformers makes only with torchvision; where that fails, the same processor for images alone
    (image_only_processors.py)."""
    from transformers import AutoProcessor

    from lapa_training.vla.image_only_processors import IMAGE_ONLY

    try:
        processor = AutoProcessor.from_pretrained(where, **dict(overrides or {}))
        if not hasattr(processor, "image_processor"):  # AutoProcessor falls back on the bare tokenizer
            raise ValueError(f"no image processor in {where} (found a {type(processor).__name__})")
        return processor
    except Exception as e:  # ImportError, or AttributeError from transformers' video registry without torchvision
        also = ""
        if model_type in IMAGE_ONLY:
            try:
                return IMAGE_ONLY[model_type](where, overrides)
            except Exception as fallback:
                also = f"; nor for images alone: {' '.join(str(fallback).split())[:200]}"
        raise VLABuildError(f"cannot load the processor of {where!r}: {' '.join(str(e).split())[:300]}{also}") from e
