"""The VLA's backbones and tokenizer: built in code ("tiny"), loaded by Hugging Face id or directory,
or rebuilt from the configs a checkpoint saved (no download).

Errors name the backbone and what to use instead (VLABuildError)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lapa_training.vla.configuration_vla import BYTE_TOKENIZER, TINY, TINY_LANGUAGE, TINY_VISION

PAD_TOKEN, EOS_TOKEN = "<pad>", "<eos>"


class VLABuildError(ValueError):
    """A backbone or tokenizer cannot be built or loaded; the message names which and why."""


# ---------------------------------------------------------------------------------------------
# tokenizers
# ---------------------------------------------------------------------------------------------
def byte_tokenizer(specials: tuple[str, ...] = (PAD_TOKEN, EOS_TOKEN), **roles: str):
    """A byte-level tokenizer built in code (no download): the special tokens first (ids 0, 1, ...), then
    the 256 byte symbols. Default: <pad> (0) and <eos> (1). `roles` name the pad/bos/eos tokens among
    `specials`; the other specials become additional special tokens (a VLM's image tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    roles = roles or {"pad_token": PAD_TOKEN, "eos_token": EOS_TOKEN}
    vocab = {s: i for i, s in enumerate(specials)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="right", **roles)
    extra = [s for s in specials if s not in roles.values()]
    if extra:
        fast.add_special_tokens({"additional_special_tokens": extra})
    return fast


def prepare_tokenizer(tokenizer, source: str):
    """Right padding, and a pad token (the eos token when it has none)."""
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise VLABuildError(f"tokenizer {source} has neither a pad nor an eos token; give VLAConfig.tokenizer "
                                f"one that has")
        tokenizer.pad_token = tokenizer.eos_token  # GPT-2 style: pads are masked out anyway
    return tokenizer


def load_tokenizer(name: str):
    """"byte" (built in), a Hugging Face id or a directory -> a prepared tokenizer."""
    if name == BYTE_TOKENIZER:
        return byte_tokenizer()
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(local_or_id(name))
    except Exception as e:  # hub/network/format errors come as many types
        raise VLABuildError(f"cannot load tokenizer {name!r}: {e}") from e
    return prepare_tokenizer(tok, repr(name))


# ---------------------------------------------------------------------------------------------
# backbones
# ---------------------------------------------------------------------------------------------
def local_or_id(name: str) -> str:
    p = Path(name).expanduser()
    return str(p) if p.is_dir() else name


def _fp32(overrides: dict[str, Any]) -> dict[str, Any]:
    """Backbones load in float32 (transformers would otherwise use the checkpoint's dtype, e.g.
    bfloat16): fp32 master weights; train with autocast, or cast the whole VLA, for half precision."""
    return {"dtype": torch.float32, **overrides}


def load_vision(name: str, overrides: dict[str, Any]) -> nn.Module:
    """"tiny" (the CNN of tiny_vision.py) or a SigLIP/CLIP/ViT id or directory -> the vision encoder."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    if name == TINY:
        from lapa_training.vla.tiny_vision import TinyConvVisionConfig, TinyConvVisionModel

        try:
            return TinyConvVisionModel(TinyConvVisionConfig(**{**TINY_VISION, **overrides}))
        except (TypeError, ValueError) as e:
            raise VLABuildError(f"cannot build the tiny vision tower with vision_overrides {overrides}: {e}") from e
    try:
        cfg = transformers.AutoConfig.from_pretrained(local_or_id(name))
        vision_cfg = getattr(cfg, "vision_config", None)
        if vision_cfg is not None:  # a full SigLIP/CLIP (text + vision) checkpoint: take its vision tower
            cls = getattr(transformers, MODEL_MAPPING_NAMES[vision_cfg.model_type])
            model = cls.from_pretrained(local_or_id(name), **_fp32(overrides))
        else:
            model = transformers.AutoModel.from_pretrained(local_or_id(name), **_fp32(overrides))
    except Exception as e:
        raise VLABuildError(f"cannot load vision backbone {name!r}: {e}") from e
    check_vision(model, name)
    return model


def check_vision(model: nn.Module, name: str) -> None:
    cfg = model.config
    if not all(hasattr(cfg, k) for k in ("image_size", "hidden_size")) or getattr(cfg, "num_channels", 3) != 3:
        raise VLABuildError(f"vision backbone {name!r} ({type(model).__name__}) is not an RGB vision encoder with "
                            f"image_size and hidden_size (use a SigLIP, CLIP or ViT vision model)")


def load_language(name: str, overrides: dict[str, Any], vocab_size: int) -> nn.Module:
    """"tiny" (a small Qwen2) or a causal LM id or directory -> the decoder without its LM head."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if name == TINY:
        return transformers.Qwen2Model(transformers.Qwen2Config(**{**TINY_LANGUAGE, "vocab_size": vocab_size,
                                                                   **overrides}))
    try:
        cfg = transformers.AutoConfig.from_pretrained(local_or_id(name))
    except Exception as e:
        raise VLABuildError(f"cannot load language backbone {name!r}: {e}") from e
    if cfg.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise VLABuildError(f"language backbone {name!r} is a {cfg.model_type!r} model, not a causal language model "
                            f"(use e.g. Qwen2, Llama or GPT-2)")
    try:
        # the decoder without its LM head: the VLA reads hidden states, never vocabulary logits
        return transformers.AutoModel.from_pretrained(local_or_id(name), **_fp32(overrides))
    except Exception as e:
        raise VLABuildError(f"cannot load language backbone {name!r}: {e}") from e


def check_sequence_length(vision: nn.Module, language: nn.Module, max_text_tokens: int) -> None:
    vc, lc = vision.config, language.config
    size, patch = vc.image_size, getattr(vc, "patch_size", None)
    limit = getattr(lc, "max_position_embeddings", None) or getattr(lc, "n_positions", None)
    if patch is None or limit is None:
        return
    h, w = (size, size) if isinstance(size, int) else size
    p = (patch, patch) if isinstance(patch, int) else patch
    image_tokens = (h // p[0]) * (w // p[1]) + 1  # + a class token, for the encoders that have one
    if image_tokens + max_text_tokens > limit:
        raise VLABuildError(f"up to {image_tokens} image tokens + max_text_tokens {max_text_tokens} exceed the "
                            f"language backbone's {limit} positions: lower max_text_tokens or the image token count")


def backbone_from_config_dict(d: dict[str, Any], what: str) -> nn.Module:
    """Rebuild a backbone (random weights) from its saved config dict: no download."""
    from transformers import AutoConfig, AutoModel

    import lapa_training.vla.tiny_vision  # noqa: F401  registers the tiny vision tower with AutoModel

    d = dict(d)
    try:
        model_type = d.pop("model_type")
        return AutoModel.from_config(AutoConfig.for_model(model_type, **d), dtype=torch.float32)
    except Exception as e:
        raise VLABuildError(f"cannot rebuild the {what} backbone from its saved config: {e}") from e


def backbone_config_dict(model: nn.Module) -> dict[str, Any]:
    """A backbone's config as JSON-ready data, for checkpoint_config."""
    d = model.config.to_dict()
    d.pop("_name_or_path", None)
    return json.loads(json.dumps(d, default=str))


def default_normalisation(vision: nn.Module, name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean/std of the vision backbone's own image processor, or the usual ones for its family."""
    if name != TINY:
        try:
            from transformers.image_processing_base import ImageProcessingMixin

            proc, _ = ImageProcessingMixin.get_image_processor_dict(local_or_id(name))
            mean, std = proc.get("image_mean"), proc.get("image_std")
            if mean is not None and std is not None:
                return tuple(float(v) for v in mean), tuple(float(v) for v in std)
        except Exception:  # no preprocessor_config.json: fall back on the family's convention
            pass
    model_type = getattr(vision.config, "model_type", "")
    if model_type.startswith("clip"):
        from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

        return tuple(OPENAI_CLIP_MEAN), tuple(OPENAI_CLIP_STD)
    if name != TINY:
        warnings.warn(f"vision backbone {name!r}: no image processor config found; normalising with mean 0.5, "
                      f"std 0.5 (set VLAConfig.image_mean / image_std to override)")
    return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
