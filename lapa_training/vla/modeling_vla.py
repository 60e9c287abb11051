"""The LAPA vision-language-action model (stages 2 and 3 of LAPA, Ye et al. 2025).

    image (B, H, W, 3) uint8 ─ preprocess_images (center-crop to square, resize, normalise; torch)
        ─ vision encoder (frozen by default) ─ patch features (B, N, Dv) ─ projector MLP ─ (B, N, D)
    instruction ─ prompt_template ─ tokenizer ─ LM input embeddings (B, T, D)
        (vision_film: the LM's final state over the instruction alone scales and shifts every conv
        layer of the tiny vision tower)
    [image tokens ; text tokens] ─ causal LM ─ final hidden state at the last non-pad position (B, D)
        ─ latent head: (B, L, |C|) logits, one categorical per latent-action token   (latent pretraining)
        ─ action head: (B, k, 7, num_bins) logits, k = chunk_size future steps       (everything else)
          or, with action_head_type "regression", (B, k, 7) values in units of each dimension's spread

Exactly one head exists, chosen by the config (``VLAConfig.head``). Finetuning a pretrained model
keeps vision encoder, projector and LM and replaces the head:
``VLAModel.from_pretrained(dir, config=..., replace_heads=True)`` (or ``VLAModel.for_finetuning``)
drops the saved head, builds a fresh one and reports which keys were loaded, new and dropped in
``model.load_report``.

Action targets are bin ids from ``ActionBins`` (fitted on the finetuning data, attached with
``set_action_bins`` and saved with the model); head outputs beyond a dimension's effective bin
count are masked out. A regression head (``action_head_type: regression``) is trained on the true
actions instead, normalised by the bins' mean and spread; its predictions are the nearest bins'
ids. Labels equal to IGNORE_INDEX (-100; NaN actions, steps past an episode's end in a chunk) are
skipped by the loss and the accuracy.

A checkpoint (``save_pretrained``) is self-contained: model.safetensors (frozen vision included),
config.json (the VLA config with ``policy_type: "lapa_vla"``, plus the backbone configs),
tokenizer/ and action_bins.json; ``from_pretrained`` rebuilds it without any download.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lapa_training.vla.action_bins import ACTION_DIM, IGNORE_INDEX, ActionBins
from lapa_training.vla.configuration_vla import (BYTE_TOKENIZER, HEAD_KEYS, POLICY_TYPE, RESOLVED_KEYS, TINY,
                                                 TINY_LANGUAGE, TINY_VISION, TRAINING_ONLY_KEYS, VLAConfig)

TOKENIZER_DIR = "tokenizer"
BINS_FILE = "action_bins.json"
PAD_TOKEN, EOS_TOKEN = "<pad>", "<eos>"


class VLABuildError(ValueError):
    """A backbone or tokenizer cannot be built or loaded; the message names which and why."""


# ---------------------------------------------------------------------------------------------
# tokenizer and backbones
# ---------------------------------------------------------------------------------------------
def byte_tokenizer():
    """A byte-level tokenizer built in code (no download): 256 byte symbols + <pad> (0) + <eos> (1)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {PAD_TOKEN: 0, EOS_TOKEN: 1}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN,
                                   padding_side="right")


def _prepare_tokenizer(tokenizer, source: str):
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise VLABuildError(f"tokenizer {source} has neither a pad nor an eos token; give VLAConfig.tokenizer "
                                f"one that has")
        tokenizer.pad_token = tokenizer.eos_token  # GPT-2 style: pads are masked out anyway
    return tokenizer


def _load_tokenizer(name: str):
    if name == BYTE_TOKENIZER:
        return byte_tokenizer()
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(Path(name).expanduser()) if Path(name).expanduser().is_dir() else name)
    except Exception as e:  # hub/network/format errors come as many types
        raise VLABuildError(f"cannot load tokenizer {name!r}: {e}") from e
    return _prepare_tokenizer(tok, repr(name))


def _local_or_id(name: str) -> str:
    p = Path(name).expanduser()
    return str(p) if p.is_dir() else name


def _fp32(overrides: dict[str, Any]) -> dict[str, Any]:
    """Backbones load in float32 (transformers would otherwise use the checkpoint's dtype, e.g.
    bfloat16): fp32 master weights; train with autocast, or cast the whole VLA, for half precision."""
    return {"dtype": torch.float32, **overrides}


def _load_vision(name: str, overrides: dict[str, Any]) -> nn.Module:
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    if name == TINY:
        from lapa_training.vla.tiny_vision import TinyConvVisionConfig, TinyConvVisionModel

        try:
            return TinyConvVisionModel(TinyConvVisionConfig(**{**TINY_VISION, **overrides}))
        except (TypeError, ValueError) as e:
            raise VLABuildError(f"cannot build the tiny vision tower with vision_overrides {overrides}: {e}") from e
    try:
        cfg = transformers.AutoConfig.from_pretrained(_local_or_id(name))
        vision_cfg = getattr(cfg, "vision_config", None)
        if vision_cfg is not None:  # a full SigLIP/CLIP (text + vision) checkpoint: take its vision tower
            cls = getattr(transformers, MODEL_MAPPING_NAMES[vision_cfg.model_type])
            model = cls.from_pretrained(_local_or_id(name), **_fp32(overrides))
        else:
            model = transformers.AutoModel.from_pretrained(_local_or_id(name), **_fp32(overrides))
    except Exception as e:
        raise VLABuildError(f"cannot load vision backbone {name!r}: {e}") from e
    _check_vision(model, name)
    return model


def _check_vision(model: nn.Module, name: str) -> None:
    cfg = model.config
    if not all(hasattr(cfg, k) for k in ("image_size", "hidden_size")) or getattr(cfg, "num_channels", 3) != 3:
        raise VLABuildError(f"vision backbone {name!r} ({type(model).__name__}) is not an RGB vision encoder with "
                            f"image_size and hidden_size (use a SigLIP, CLIP or ViT vision model)")


def _load_language(name: str, overrides: dict[str, Any], vocab_size: int) -> nn.Module:
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if name == TINY:
        return transformers.Qwen2Model(transformers.Qwen2Config(**{**TINY_LANGUAGE, "vocab_size": vocab_size,
                                                                   **overrides}))
    try:
        cfg = transformers.AutoConfig.from_pretrained(_local_or_id(name))
    except Exception as e:
        raise VLABuildError(f"cannot load language backbone {name!r}: {e}") from e
    if cfg.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise VLABuildError(f"language backbone {name!r} is a {cfg.model_type!r} model, not a causal language model "
                            f"(use e.g. Qwen2, Llama or GPT-2)")
    try:
        # the decoder without its LM head: the VLA reads hidden states, never vocabulary logits
        return transformers.AutoModel.from_pretrained(_local_or_id(name), **_fp32(overrides))
    except Exception as e:
        raise VLABuildError(f"cannot load language backbone {name!r}: {e}") from e


def _check_sequence_length(vision: nn.Module, language: nn.Module, max_text_tokens: int) -> None:
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


def _model_from_config_dict(d: dict[str, Any], what: str) -> nn.Module:
    """Rebuild a backbone (random weights) from its saved config dict: no download."""
    from transformers import AutoConfig, AutoModel

    import lapa_training.vla.tiny_vision  # noqa: F401  registers the tiny vision tower with AutoModel

    d = dict(d)
    try:
        model_type = d.pop("model_type")
        return AutoModel.from_config(AutoConfig.for_model(model_type, **d), dtype=torch.float32)
    except Exception as e:
        raise VLABuildError(f"cannot rebuild the {what} backbone from its saved config: {e}") from e


def _backbone_config_dict(model: nn.Module) -> dict[str, Any]:
    d = model.config.to_dict()
    d.pop("_name_or_path", None)
    return json.loads(json.dumps(d, default=str))


def _default_normalisation(vision: nn.Module, name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean/std of the vision backbone's own image processor, or the usual ones for its family."""
    if name != TINY:
        try:
            from transformers.image_processing_base import ImageProcessingMixin

            proc, _ = ImageProcessingMixin.get_image_processor_dict(_local_or_id(name))
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


# ---------------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------------
@dataclass
class VLAOutput:
    head: str  # "latent" or "action"
    logits: torch.Tensor  # latent (B, L, |C|); action (B, k, 7, num_bins), invalid bins at dtype min;
    # regression action head (B, k, 7): each value's offset from the training mean in spreads
    predictions: torch.Tensor  # argmax ids: latent (B, L); action (B, k, 7) (regression: the nearest bin)
    hidden: torch.Tensor  # (B, D) the LM's final hidden state the head read
    loss: torch.Tensor | None = None  # mean cross-entropy over labelled positions (labels given), plus
    # config.expectation_loss x the expected-action squared error (actions given); regression head:
    # the mean squared error in spreads
    accuracy: torch.Tensor | None = None  # fraction of labelled positions predicted exactly (labels given)


@dataclass
class LoadReport:
    """What from_pretrained did with the weights: state-dict keys loaded, freshly initialised, dropped."""

    source: str = ""
    loaded: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (f"{self.source}: {len(self.loaded)} tensors loaded, {len(self.new)} new "
                f"({_prefixes(self.new)}), {len(self.dropped)} dropped ({_prefixes(self.dropped)})")


def _prefixes(keys: list[str]) -> str:
    return ", ".join(sorted({k.split(".")[0] for k in keys})) or "none"


class MLPHead(nn.Module):
    """LayerNorm -> Linear -> GELU -> Linear; zero_out: the last Linear starts at zero (outputs 0)."""

    def __init__(self, dim: int, hidden: int, out: int, zero_out: bool = False):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, out))
        for m in self.net:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        if zero_out:
            nn.init.zeros_(self.net[-1].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# ---------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------
class VLAModel(nn.Module):
    """Vision encoder + projector + causal LM + one head (see the module doc).

    ``VLAModel(config)`` builds the backbones the config names (tiny ones in code, others with
    ``from_pretrained``); ``vision``/``language``/``tokenizer`` given explicitly are used instead
    (that is how ``from_pretrained`` rebuilds a checkpoint without downloading)."""

    def __init__(self, config: VLAConfig, *, vision: nn.Module | None = None, language: nn.Module | None = None,
                 tokenizer=None, action_bins: ActionBins | None = None):
        super().__init__()
        # own copy, validated; backbone names are only checked where they are about to be loaded
        config = VLAConfig.from_dict(config.to_dict(), check_backbones=False)
        if vision is None or language is None or tokenizer is None:
            config.validate()
        if tokenizer is None:
            tok_name = config.tokenizer or (BYTE_TOKENIZER if config.language_backbone == TINY
                                            else config.language_backbone)
            tokenizer = _load_tokenizer(tok_name)
            config.tokenizer = tok_name
        else:
            tokenizer = _prepare_tokenizer(tokenizer, "given")
        self.tokenizer = tokenizer
        self.vision = vision if vision is not None else _load_vision(config.vision_backbone, config.vision_overrides)
        _check_vision(self.vision, config.vision_backbone)
        self.language = language if language is not None else \
            _load_language(config.language_backbone, config.language_overrides, len(tokenizer))
        vocab = self.language.get_input_embeddings().num_embeddings
        if len(tokenizer) > vocab:
            raise VLABuildError(f"the tokenizer has {len(tokenizer)} tokens but the language backbone's embedding "
                                f"table only {vocab}: use the backbone's own tokenizer")

        _check_sequence_length(self.vision, self.language, config.max_text_tokens)
        vision_dim = int(self.vision.config.hidden_size)
        lm_dim = int(self.language.get_input_embeddings().embedding_dim)
        if config.image_mean is None or config.image_std is None:
            mean, std = _default_normalisation(self.vision, config.vision_backbone)
            config.image_mean = config.image_mean or mean
            config.image_std = config.image_std or std
        config.projector_hidden = config.projector_hidden or lm_dim
        config.head_hidden = config.head_hidden or lm_dim
        self.config = config.validate(check_backbones=False)
        size = self.vision.config.image_size
        self.image_size = (int(size), int(size)) if isinstance(size, int) else tuple(int(v) for v in size)
        self.projector = nn.Sequential(nn.Linear(vision_dim, config.projector_hidden), nn.GELU(),
                                       nn.Linear(config.projector_hidden, lm_dim))
        for m in self.projector:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.instruction_film: nn.Linear | None = None
        if config.vision_film:
            channels = getattr(self.vision, "film_channels", None)
            if channels is None:
                raise VLABuildError(f"vision_film needs the built-in tiny vision tower (vision_backbone 'tiny'); "
                                    f"{config.vision_backbone!r} has no FiLM-conditioned layers")
            self.instruction_film = nn.Linear(lm_dim, 2 * sum(channels))
            nn.init.zeros_(self.instruction_film.weight)  # starts as the unconditioned tower
            nn.init.zeros_(self.instruction_film.bias)
        self.spatial_readout: nn.Module | None = None
        self.keypoint_logits: nn.Module | None = None
        self.keypoint_readout: nn.Module | None = None
        self.image_tokens = 0
        if config.spatial_readout or config.keypoints:
            with torch.no_grad():  # how many tokens this vision tower makes (class token or not)
                probe = torch.zeros(1, 3, *self.image_size, dtype=next(self.vision.parameters()).dtype)
                self.image_tokens = int(self.vision(pixel_values=probe).last_hidden_state.shape[1])
        if config.spatial_readout:
            self.spatial_readout = nn.Sequential(nn.Linear(lm_dim, config.spatial_readout), nn.Flatten(1),
                                                 nn.Linear(config.spatial_readout * self.image_tokens, lm_dim))
        if config.keypoints:
            side = int(round(self.image_tokens ** 0.5))
            if side * side != self.image_tokens:
                raise VLABuildError(f"keypoints need a square grid of image tokens; this vision tower makes "
                                    f"{self.image_tokens} (a class token?)")
            ys, xs = torch.meshgrid(torch.linspace(-1, 1, side), torch.linspace(-1, 1, side), indexing="ij")
            self.register_buffer("token_grid", torch.stack([xs.flatten(), ys.flatten()], dim=1), persistent=False)
            self.keypoint_logits = nn.Linear(lm_dim, config.keypoints)
            self.keypoint_readout = nn.Linear(2 * config.keypoints, lm_dim)
        self.register_buffer("pixel_scale", 1.0 / (255.0 * torch.tensor(config.image_std)).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("pixel_shift", (torch.tensor(config.image_mean) / torch.tensor(config.image_std))
                             .view(1, 3, 1, 1), persistent=False)
        self.latent_head: MLPHead | None = None
        self.action_head: MLPHead | None = None
        self.action_bins: ActionBins | None = None
        self._build_heads()
        if action_bins is not None:
            self.set_action_bins(action_bins)
        self._apply_freezing()
        self.load_report: LoadReport | None = None

    # ---- sizes and parts -----------------------------------------------------------------
    @property
    def head(self) -> str:
        return self.config.head

    @property
    def hidden_size(self) -> int:
        return int(self.language.get_input_embeddings().embedding_dim)

    @property
    def device(self) -> torch.device:
        return self.projector[0].weight.device

    def _build_heads(self) -> None:
        cfg, dim = self.config, self.hidden_size
        self.latent_head = self.action_head = None
        if cfg.head == "latent":
            self.latent_head = MLPHead(dim, cfg.head_hidden, cfg.latent_tokens * cfg.codebook_size,
                                       zero_out=cfg.zero_init_head)
        else:
            per_dim = 1 if cfg.action_head_type == "regression" else cfg.num_bins
            self.action_head = MLPHead(dim, cfg.head_hidden, cfg.chunk_size * ACTION_DIM * per_dim,
                                       zero_out=cfg.zero_init_head)
        self.register_buffer("bin_mask", torch.ones(ACTION_DIM, cfg.num_bins, dtype=torch.bool), persistent=False)
        # each bin's value, each dimension's spread and mean and which dimensions are continuous:
        # from the action bins (set_action_bins), for the expected or regressed action
        self.register_buffer("bin_values", torch.zeros(ACTION_DIM, cfg.num_bins), persistent=False)
        self.register_buffer("bin_spread", torch.ones(ACTION_DIM), persistent=False)
        self.register_buffer("bin_center", torch.zeros(ACTION_DIM), persistent=False)
        self.register_buffer("bin_continuous", torch.zeros(ACTION_DIM, dtype=torch.bool), persistent=False)
        if self.action_bins is not None:
            self.set_action_bins(self.action_bins)

    def _apply_freezing(self) -> None:
        self.vision.requires_grad_(not self.config.freeze_vision)
        self.language.requires_grad_(not self.config.freeze_language)
        self.train(self.training)

    def train(self, mode: bool = True) -> "VLAModel":
        super().train(mode)
        if self.config.freeze_vision:  # frozen parts stay in eval mode (no dropout, fixed norms)
            self.vision.eval()
        if self.config.freeze_language:
            self.language.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def parameter_counts(self) -> dict[str, int]:
        parts = {"vision": self.vision, "projector": self.projector, "language": self.language,
                 "instruction_film": self.instruction_film, "spatial_readout": self.spatial_readout,
                 "keypoint_logits": self.keypoint_logits,
                 "keypoint_readout": self.keypoint_readout, "latent_head": self.latent_head,
                 "action_head": self.action_head}
        return {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items() if m is not None}

    def set_action_bins(self, bins: ActionBins) -> None:
        """Attach the action bins (fitted on the finetuning data); they are saved with the model and
        mask head outputs beyond each dimension's effective bin count."""
        if not isinstance(bins, ActionBins):
            raise TypeError(f"set_action_bins expects ActionBins, got {type(bins).__name__}")
        if bins.num_dims != ACTION_DIM:
            raise ValueError(f"action bins have {bins.num_dims} dimensions, the action head predicts {ACTION_DIM}")
        mask = torch.from_numpy(bins.valid_mask(self.config.num_bins))  # raises when a dim has too many bins
        self.action_bins = bins
        device = self.bin_mask.device
        self.bin_mask = mask.to(device)
        self.bin_values = torch.from_numpy(bins.value_table(self.config.num_bins)).float().to(device)
        self.bin_spread = torch.from_numpy(self._floored_spreads(bins)).float().to(device)
        self.bin_center = torch.from_numpy(bins.means()).float().to(device)
        self.bin_continuous = torch.from_numpy(bins.continuous_dims).to(device)

    def _floored_spreads(self, bins: ActionBins) -> np.ndarray:
        """(7,) the unit each dimension's error is measured in: its spread in the training actions, at
        least config.action_spread_floor (translation, rotation) per step; the gripper's own."""
        translation, rotation = self.config.action_spread_floor
        floor = np.array([translation] * 3 + [rotation] * 3 + [0.0])
        return np.maximum(bins.spreads(), floor)

    # ---- inputs --------------------------------------------------------------------------
    def preprocess_images(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 RGB (B, H, W, 3) or (H, W, 3), numpy or torch -> normalised float (B, 3, h, w) at the
        vision encoder's size. Non-square images are center-cropped to a square first (as dataset
        ingest does), then resized (area averaging when shrinking, bilinear when growing)."""
        if torch.is_tensor(images):
            x = images
        else:
            a = np.asarray(images)
            x = torch.from_numpy(np.array(a) if not a.flags.writeable else np.ascontiguousarray(a))
        if x.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 RGB (H, W, 3) or (B, H, W, 3), got dtype {x.dtype}")
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[-1] != 3 or x.shape[1] == 0 or x.shape[2] == 0:
            raise ValueError(f"images must be uint8 RGB (H, W, 3) or (B, H, W, 3), got shape {tuple(x.shape)}")
        x = x.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        h, w = x.shape[-2:]
        if h != w:
            s = min(h, w)
            top, left = (h - s) // 2, (w - s) // 2
            x = x[:, :, top:top + s, left:left + s]
        if tuple(x.shape[-2:]) != self.image_size:
            shrink = x.shape[-2] >= self.image_size[0]
            x = F.interpolate(x, size=self.image_size, mode="area" if shrink else "bilinear",
                              **({} if shrink else {"align_corners": False}))
        x = (x * self.pixel_scale - self.pixel_shift).contiguous()
        return x.to(self._vision_dtype())

    def _vision_dtype(self) -> torch.dtype:
        return next(self.vision.parameters()).dtype

    def prompts(self, instructions: Sequence[str]) -> list[str]:
        return [self.config.prompt_template.format(instruction=str(s).strip()) for s in instructions]

    def tokenize(self, instructions: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Instructions -> (input_ids, attention_mask), both (B, T) int64, right-padded, at most
        max_text_tokens long, on the model's device."""
        if isinstance(instructions, str):
            instructions = [instructions]
        enc = self.tokenizer(self.prompts(instructions), padding=True, truncation=True,
                             max_length=self.config.max_text_tokens, return_tensors="pt")
        ids = enc["input_ids"].to(self.device, torch.long)
        mask = enc["attention_mask"].to(self.device, torch.long)
        return ids, mask

    def encode_actions(self, actions: np.ndarray) -> torch.Tensor:
        """(..., 7) float actions -> (..., 7) int64 bin-id labels (NaN -> IGNORE_INDEX)."""
        if self.action_bins is None:
            raise RuntimeError("this model has no action bins: fit them with ActionBins.fit on the finetuning "
                               "actions and call model.set_action_bins(bins)")
        return torch.from_numpy(self.action_bins.encode(actions)).to(self.device)

    # ---- forward -------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor, film: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3, h, w) preprocessed images -> projected patch tokens (B, N, D); film: the tiny tower's
        per-sample FiLM vector (vision_film)."""
        extra = {} if film is None else {"film": film}
        if self.config.freeze_vision and film is None:
            with torch.no_grad():
                feats = self.vision(pixel_values=pixel_values).last_hidden_state
        else:  # frozen weights still pass gradients to the FiLM vector
            feats = self.vision(pixel_values=pixel_values, **extra).last_hidden_state
        return self.projector(feats.to(self.projector[0].weight.dtype))

    def instruction_state(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The LM's final hidden state at the last non-pad token of the instruction alone (B, D)."""
        text = self.language.get_input_embeddings()(input_ids)
        padded = attention_mask is not None and not bool(attention_mask.all())
        hidden = self.language(inputs_embeds=text, attention_mask=attention_mask if padded else None,
                               use_cache=False).last_hidden_state
        return self._last_text_state(hidden, attention_mask)

    @staticmethod
    def _last_text_state(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """(B, T, D) states over the text alone (right-padded) -> (B, D) at each row's last real token."""
        b, t = hidden.shape[:2]
        last = (attention_mask.sum(1) - 1).clamp(min=0) if attention_mask is not None else \
            torch.full((b,), t - 1, device=hidden.device, dtype=torch.long)
        return hidden[torch.arange(b, device=hidden.device), last]

    def final_hidden(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The LM's final hidden state at the last non-pad position of [image tokens; text] (or, with
        config.text_first, [text; image tokens]) (B, D), plus, with config.spatial_readout or keypoints,
        what the image tokens' final states say by position."""
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[-2:]) != self.image_size:
            raise ValueError(f"pixel_values must be (B, 3, {self.image_size[0]}, {self.image_size[1]}) (use "
                             f"preprocess_images), got {tuple(pixel_values.shape)}")
        if input_ids.ndim != 2 or input_ids.shape[0] != pixel_values.shape[0]:
            raise ValueError(f"input_ids must be (B, T) with B = {pixel_values.shape[0]} images, got "
                             f"{tuple(input_ids.shape)}")
        text = self.language.get_input_embeddings()(input_ids)
        b, t = text.shape[:2]
        padded = attention_mask is not None and not bool(attention_mask.all())
        if self.config.text_first:  # [text; image]: the last position is always the last image token
            # causal attention: the text's states do not depend on the image, so one pass over the text
            # gives FiLM's instruction state and the keys/values the image tokens then attend to
            prefix = self.language(inputs_embeds=text, attention_mask=attention_mask if padded else None,
                                   use_cache=True)
            film = None if self.instruction_film is None else \
                self.instruction_film(self._last_text_state(prefix.last_hidden_state, attention_mask))
            image_tokens = self.encode_images(pixel_values, film).to(text.dtype)
            n = image_tokens.shape[1]
            full_mask = torch.cat([attention_mask, attention_mask.new_ones(b, n)], dim=1) if padded else None
            # positions count real tokens only, so pads in the middle do not shift the image
            positions = (full_mask.cumsum(1) - 1).clamp(min=0)[:, t:] if padded else None
            hidden = self.language(inputs_embeds=image_tokens, attention_mask=full_mask, position_ids=positions,
                                   past_key_values=prefix.past_key_values, use_cache=True).last_hidden_state
            image = slice(0, n)
            out = hidden[:, -1]
        else:  # [image; text], as in the paper: the last position is the last non-pad text token
            film = None if self.instruction_film is None else \
                self.instruction_film(self.instruction_state(input_ids, attention_mask))
            image_tokens = self.encode_images(pixel_values, film)
            n = image_tokens.shape[1]
            x = torch.cat([image_tokens.to(text.dtype), text], dim=1)
            image = slice(0, n)
            full_mask = torch.cat([attention_mask.new_ones(b, n), attention_mask], dim=1) if padded else None
            positions = torch.arange(x.shape[1], device=x.device)
            last = (full_mask * positions).argmax(dim=1) if padded else torch.full(
                (b,), x.shape[1] - 1, device=x.device, dtype=torch.long)
            hidden = self.language(inputs_embeds=x, attention_mask=full_mask, use_cache=False,
                                   position_ids=(full_mask.cumsum(1) - 1).clamp(min=0) if padded else None
                                   ).last_hidden_state
            out = hidden[torch.arange(b, device=x.device), last]
        if self.spatial_readout is not None:  # + the image tokens' states, laid out by position
            out = out + self.spatial_readout(hidden[:, image])
        if self.keypoint_logits is not None:  # + where each keypoint's softmax over the tokens puts it
            weights = self.keypoint_logits(hidden[:, image]).softmax(dim=1)  # (B, N, K)
            where = torch.einsum("bnk,nc->bkc", weights, self.token_grid.to(weights.dtype))  # (B, K, 2)
            out = out + self.keypoint_readout(where.flatten(1))
        return out

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                actions: torch.Tensor | np.ndarray | None = None) -> VLAOutput:
        """pixel_values (B, 3, h, w) from preprocess_images; input_ids / attention_mask (B, T) from
        tokenize; labels (optional): latent head (B, L) token ids in [0, |C|); action head (B, k, 7)
        (or (B, 7) when k = 1) bin ids; IGNORE_INDEX (-100) positions are skipped. actions (optional,
        with labels, action head): the true actions the labels were encoded from, same shape, NaN
        where unknown; with config.expectation_loss > 0 the loss also holds the expected-action error."""
        h = self.final_hidden(pixel_values, input_ids, attention_mask)
        h = h.to((self.latent_head or self.action_head).net[1].weight.dtype)
        b, cfg = h.shape[0], self.config
        regression = self.action_head is not None and cfg.action_head_type == "regression"
        if self.latent_head is not None:
            logits = self.latent_head(h).view(b, cfg.latent_tokens, cfg.codebook_size)
        elif regression:
            logits = self.action_head(h).view(b, cfg.chunk_size, ACTION_DIM)
        else:
            logits = self.action_head(h).view(b, cfg.chunk_size, ACTION_DIM, cfg.num_bins)
            if not bool(self.bin_mask.all()):
                logits = logits.masked_fill(~self.bin_mask, torch.finfo(logits.dtype).min)
        predictions = self._nearest_bins(self.regressed_actions(logits)) if regression else logits.argmax(dim=-1)
        out = VLAOutput(head=self.head, logits=logits, predictions=predictions, hidden=h)
        if labels is not None:
            labels = self._check_labels(labels, predictions)
            valid = labels != IGNORE_INDEX
            n = valid.sum()
            if int(n) == 0:
                out.loss = (logits * 0.0).sum()  # keeps the graph; no labelled position
                out.accuracy = torch.zeros((), device=logits.device)
            else:
                out.loss = self._regression_error(logits, actions, labels) if regression else F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX)
                out.accuracy = ((predictions == labels) & valid).sum().float() / n
            if actions is not None and self.action_head is not None and cfg.expectation_loss > 0:
                out.loss = out.loss + cfg.expectation_loss * self._expectation_error(logits, actions, labels.shape)
        return out

    def regressed_actions(self, outputs: torch.Tensor) -> torch.Tensor:
        """Regression-head outputs (B, k, 7), in spreads about the training mean -> (B, k, 7) float32 actions."""
        return self.bin_center + outputs.float() * self.bin_spread

    def _nearest_bins(self, actions: torch.Tensor) -> torch.Tensor:
        """(B, k, 7) actions -> (B, k, 7) ids of the bins whose values are nearest (valid bins only)."""
        distance = (actions[..., None] - self.bin_values).abs().masked_fill(~self.bin_mask, float("inf"))
        return distance.argmin(dim=-1)

    def _regression_error(self, outputs: torch.Tensor, actions, labels: torch.Tensor) -> torch.Tensor:
        """Mean squared error of the regression head in units of each dimension's spread, over the
        labelled positions; the targets are the true actions where given, else the labels' bin values."""
        valid = labels != IGNORE_INDEX
        if actions is None:
            dims = torch.arange(ACTION_DIM, device=labels.device)
            target = self.bin_values[dims, labels.clamp(min=0)]  # each label's bin value, per dimension
        else:
            target = torch.as_tensor(actions, device=outputs.device, dtype=torch.float32).reshape(labels.shape)
            valid = valid & torch.isfinite(target)
        if not bool(valid.any()):
            return (outputs * 0.0).sum()
        err = outputs.float() - (target.nan_to_num() - self.bin_center) / self.bin_spread
        return err[valid].square().mean()

    def expected_actions(self, logits: torch.Tensor) -> torch.Tensor:
        """Action-head logits (B, k, 7, num_bins) -> (B, k, 7) float32 expected actions: each
        dimension's bin values weighted by their softmax probabilities (needs the action bins)."""
        if self.action_bins is None:
            raise RuntimeError("this model has no action bins (set_action_bins): cannot turn bins into actions")
        if self.config.action_head_type == "regression":
            raise RuntimeError("this model's action head regresses actions (regressed_actions), it has no bins")
        return (logits.float().softmax(dim=-1) * self.bin_values).sum(dim=-1)

    def _expectation_error(self, logits: torch.Tensor, actions, shape: torch.Size) -> torch.Tensor:
        """Mean squared error of the expected action on the continuous dimensions with a finite true
        value, in units of each dimension's spread."""
        target = torch.as_tensor(actions, device=logits.device, dtype=torch.float32).reshape(shape)
        known = torch.isfinite(target) & self.bin_continuous
        if not bool(known.any()):
            return (logits * 0.0).sum()
        err = (self.expected_actions(logits) - target.nan_to_num()) / self.bin_spread
        return err[known].square().mean()

    def decode_actions(self, out: VLAOutput) -> np.ndarray:
        """An action-head output -> (B, k, 7) float32 actions, read as config.action_decoding says."""
        if self.action_bins is None:
            raise RuntimeError("this model has no action bins (set_action_bins): cannot turn bins into actions")
        actions = self.action_bins.decode(out.predictions.detach().cpu().numpy())
        if self.config.action_head_type == "regression":  # continuous dimensions as regressed, the rest snapped
            values = self.regressed_actions(out.logits.detach())
        elif self.config.action_decoding == "expectation":
            values = self.expected_actions(out.logits.detach())
        else:
            return actions
        continuous = self.action_bins.continuous_dims
        actions[..., continuous] = values.cpu().numpy()[..., continuous]
        return actions

    def _check_labels(self, labels: torch.Tensor, predictions: torch.Tensor) -> torch.Tensor:
        labels = torch.as_tensor(labels, device=predictions.device).long()
        want = tuple(predictions.shape)
        if self.head == "action" and labels.ndim == 2 and self.config.chunk_size == 1:
            labels = labels[:, None]
        if tuple(labels.shape) != want:
            what = "latent-action tokens (B, L)" if self.head == "latent" else "action bin ids (B, k, 7)"
            raise ValueError(f"labels must be {what} = {want}, got {tuple(labels.shape)}")
        valid = labels != IGNORE_INDEX
        if self.head == "latent":
            bad = valid & ((labels < 0) | (labels >= self.config.codebook_size))
        else:
            limit = self.bin_mask.sum(dim=1)  # (7,) effective bins per dimension
            bad = valid & ((labels < 0) | (labels >= limit))
        if bool(bad.any()):
            raise ValueError(f"labels hold ids outside the head's classes (e.g. {int(labels[bad][0])}); latent "
                             f"tokens must be < codebook_size {self.config.codebook_size}, action bins < each "
                             f"dimension's bin count {self.bin_mask.sum(dim=1).tolist()}")
        return labels

    # ---- inference -----------------------------------------------------------------------
    @torch.inference_mode()
    def predict_actions(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                        attention_mask: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
        """-> (bin ids (B, k, 7) int64 (argmax), actions (B, k, 7) float32 read as config.action_decoding says)."""
        if self.action_head is None:
            raise RuntimeError("this model has a latent-action head, not an action head: finetune it first")
        if self.action_bins is None:
            raise RuntimeError("this model has no action bins (set_action_bins): cannot turn bins into actions")
        out = self.forward(pixel_values, input_ids, attention_mask)
        return out.predictions.cpu().numpy(), self.decode_actions(out)

    @torch.inference_mode()
    def predict_latent(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Latent-action tokens (B, L) int64."""
        if self.latent_head is None:
            raise RuntimeError("this model has an action head, not a latent-action head")
        return self.forward(pixel_values, input_ids, attention_mask).predictions

    # ---- heads ---------------------------------------------------------------------------
    def replace_heads(self, config: VLAConfig | None = None, **overrides) -> LoadReport:
        """Drop the current head and build a fresh one for `config` (default: this config's
        ``finetune(**overrides)``). Backbones and projector are kept; the new config may differ from
        the current one only in head and training-only keys. Action bins are dropped with the head
        (set the finetuning data's with set_action_bins). Returns the keys new and dropped."""
        new = config if config is not None else self.config.finetune(**overrides)
        if config is not None and overrides:
            raise ValueError("replace_heads: give a config or overrides, not both")
        new = _fill_resolved(new, self.config)
        from lapa_training.checkpoint import check_config_compatible

        check_config_compatible(self.config.to_dict(), new.to_dict(), source="being converted",
                                ignore=HEAD_KEYS + TRAINING_ONLY_KEYS)
        before = {k for k in self.state_dict() if k.startswith(("latent_head.", "action_head."))}
        device, dtype = self.device, self.projector[0].weight.dtype
        self.config = new.validate(check_backbones=False)
        self.action_bins = None  # bins belong to the head's training data: fit them on the finetuning data
        self._build_heads()
        for head in (self.latent_head, self.action_head):
            if head is not None:
                head.to(device=device, dtype=dtype)
        for name in ("bin_mask", "bin_values", "bin_spread", "bin_center", "bin_continuous"):
            setattr(self, name, getattr(self, name).to(device))
        self._apply_freezing()
        after = {k for k in self.state_dict() if k.startswith(("latent_head.", "action_head."))}
        return LoadReport(source="replace_heads", new=sorted(after), dropped=sorted(before))

    # ---- persistence ---------------------------------------------------------------------
    def checkpoint_config(self) -> dict[str, Any]:
        """What config.json holds: policy_type, the VLA config, and the backbone configs."""
        return {"policy_type": POLICY_TYPE, **self.config.to_dict(),
                "backbones": {"vision": _backbone_config_dict(self.vision),
                              "language": _backbone_config_dict(self.language)}}

    def save_pretrained(self, directory: str | Path, *, optimizer: torch.optim.Optimizer | None = None,
                        scheduler: Any = None, step: int = 0, extra: dict | None = None) -> Path:
        """Write a self-contained checkpoint (weights incl. frozen vision, config + backbone configs,
        tokenizer, action bins), atomically; with `optimizer` (+ `scheduler`) also the trainer state
        that ``lapa_training.checkpoint.load_trainer_state`` restores."""
        def write_files(dest: Path) -> None:
            self.tokenizer.save_pretrained(str(dest / TOKENIZER_DIR))
            if self.action_bins is not None:
                self.action_bins.save(dest / BINS_FILE)

        from lapa_training.checkpoint import save_checkpoint

        return save_checkpoint(directory, self, self.checkpoint_config(), optimizer=optimizer, scheduler=scheduler,
                               step=step, extra=extra, write_files=write_files)

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, config: VLAConfig | None = None, replace_heads: bool = False,
                        map_location: str | torch.device = "cpu") -> "VLAModel":
        """Load a checkpoint written by save_pretrained (no download).

        config: with replace_heads=False, it must match the saved config except training-only keys
        (freeze_*, control_rate), which it then sets. replace_heads=True: keep vision, projector and
        LM, drop the saved head and build a fresh one for `config` (default: the saved config's
        ``finetune()``); `config` may then also differ in head keys. ``model.load_report`` lists
        the loaded, new and dropped keys."""
        from lapa_training.checkpoint import CheckpointError, check_config_compatible, load_checkpoint, \
            load_model_state

        state, saved, _ = load_checkpoint(directory, device=str(map_location))
        path = _resolved(directory)
        saved = dict(saved)
        saved.pop("policy_type", None)
        saved.setdefault("spatial_readout", 0)  # checkpoints from before the option had none
        saved.setdefault("text_first", False)
        saved.setdefault("keypoints", 0)
        saved.setdefault("action_decoding", "argmax")
        saved.setdefault("expectation_loss", 0.0)
        saved.setdefault("action_head_type", "bins")
        saved.setdefault("vision_film", False)
        saved.setdefault("action_spread_floor", [0.0, 0.0])  # before the option: each dimension's own spread
        backbones = saved.pop("backbones", None)
        if not isinstance(backbones, dict) or not {"vision", "language"} <= set(backbones):
            raise CheckpointError(f"{path}/config.json has no backbone configs: not a VLA checkpoint written by "
                                  f"VLAModel.save_pretrained")
        try:
            saved_config = VLAConfig.from_dict(saved, check_backbones=False)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"checkpoint {path} does not hold a valid VLA config: {e}") from e
        if not (path / TOKENIZER_DIR).is_dir():
            raise CheckpointError(f"checkpoint {path} has no {TOKENIZER_DIR}/ directory")
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path / TOKENIZER_DIR))
        except Exception as e:
            raise CheckpointError(f"cannot read the tokenizer of {path}: {e}") from e
        bins = None
        if (path / BINS_FILE).is_file():
            try:
                bins = ActionBins.load(path / BINS_FILE)
            except ValueError as e:
                raise CheckpointError(str(e)) from e
        vision = _model_from_config_dict(backbones["vision"], "vision")
        language = _model_from_config_dict(backbones["language"], "language")
        model = cls(saved_config, vision=vision, language=language, tokenizer=tokenizer, action_bins=bins)
        load_model_state(model, state, source=path)
        report = LoadReport(source=str(path), loaded=sorted(state))
        if replace_heads:
            heads = model.replace_heads(config if config is not None else saved_config.finetune())
            head_keys = set(heads.dropped)
            report.loaded = [k for k in report.loaded if k not in head_keys]
            report.new, report.dropped = heads.new, heads.dropped
        elif config is not None:
            config = _fill_resolved(config, model.config)
            check_config_compatible(model.config.to_dict(), config.to_dict(), source=path, ignore=TRAINING_ONLY_KEYS)
            model.config = config.validate(check_backbones=False)
            model._apply_freezing()
        model.load_report = report
        return model.to(map_location)

    @classmethod
    def for_finetuning(cls, pretrained: str | Path, *, keep_head: bool = False,
                       map_location: str | torch.device = "cpu", **overrides) -> "VLAModel":
        """A pretrained checkpoint (any objective) as a finetuning model: backbones and projector
        loaded, a fresh action head for ``saved_config.finetune(**overrides)``.

        keep_head: keep the checkpoint's action head and its action bins too (a run pretrained on
        actions of the same action space, e.g. ACTIONVLA: its head is what it learnt). `overrides`
        may then set training-only keys, or head keys only to the values the head already has."""
        from lapa_training.checkpoint import CONFIG_FILE

        saved = json.loads((_resolved(pretrained) / CONFIG_FILE).read_text())
        saved = {k: v for k, v in saved.items() if k not in ("policy_type", "backbones")}
        config = VLAConfig.from_dict(saved, check_backbones=False).finetune(**overrides)
        if not keep_head:
            return cls.from_pretrained(pretrained, config=config, replace_heads=True, map_location=map_location)
        model = cls.from_pretrained(pretrained, map_location=map_location)
        if model.action_head is None or model.action_bins is None:
            raise ValueError(f"{_resolved(pretrained)} has a latent-action head, not an action head: there is no "
                             f"action head to keep (finetune it without keeping the head)")
        from lapa_training.checkpoint import config_mismatches

        config = _fill_resolved(config, model.config)
        # the model is the checkpoint's as it is: only training-only keys (and the stage) may differ
        diffs = config_mismatches(model.config.to_dict(), config.to_dict(), ignore=TRAINING_ONLY_KEYS + ("stage",))
        if diffs:
            raise ValueError(f"keeping the pretrained action head, its {', '.join(k for k, _, _ in diffs)} cannot "
                             f"change (pretrained: {', '.join(f'{k}={a!r}' for k, a, _ in diffs)})")
        model.config = config.validate(check_backbones=False)
        model._apply_freezing()
        return model


def _fill_resolved(config: VLAConfig, current: VLAConfig) -> VLAConfig:
    """`config` with its None-means-default keys taken from the built model's resolved config."""
    d = config.to_dict()
    for key in RESOLVED_KEYS:
        if d[key] is None:
            d[key] = current.to_dict()[key]
    return VLAConfig.from_dict(d, check_backbones=False)


def _resolved(directory: str | Path) -> Path:
    from lapa_training.checkpoint import resolve_checkpoint

    return resolve_checkpoint(directory)
