"""The LAPA vision-language-action model (stages 2 and 3 of LAPA, Ye et al. 2025).

    image (B, H, W, 3) uint8 ─ preprocess_images (processor_vla: center-crop, resize, normalise)
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
tokenizer/ and action_bins.json; ``from_pretrained`` rebuilds it without any download, reading
checkpoints of earlier versions through ``migrate_vla_config``.

Beside this module: backbones.py (loading backbones and tokenizers), processor_vla.py (images,
instructions and action bins into model inputs and targets), configuration_vla.py (the config).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lapa_training.vla.action_bins import ACTION_DIM, IGNORE_INDEX, ActionBins
from lapa_training.vla.backbones import (VLABuildError, backbone_config_dict, backbone_from_config_dict,
                                         check_sequence_length, check_vision, default_normalisation, load_language,
                                         load_tokenizer, load_vision, prepare_tokenizer)
# importable from here as before the split (lapa_cli/train.py imports VLABuildError from this module)
from lapa_training.vla.backbones import EOS_TOKEN, PAD_TOKEN, byte_tokenizer  # noqa: F401
from lapa_training.vla.configuration_vla import (BYTE_TOKENIZER, HEAD_KEYS, POLICY_TYPE, RESOLVED_KEYS, TINY,
                                                 TRAINING_ONLY_KEYS, VLAConfig, migrate_vla_config)
from lapa_training.vla.processor_vla import VLAProcessor, action_bin_tables
from lapa_training.vla.vlm_backbone import PROCESSOR_DIR, VLMBackbone

TOKENIZER_DIR = "tokenizer"
BINS_FILE = "action_bins.json"


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
    loss: torch.Tensor | None = None  # mean cross-entropy over labelled positions (labels given);
    # regression head: the mean squared error in spreads
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
                 tokenizer=None, vlm: VLMBackbone | None = None, action_bins: ActionBins | None = None):
        super().__init__()
        # own copy, validated; backbone names are only checked where they are about to be loaded
        config = VLAConfig.from_dict(config.to_dict(), check_backbones=False)
        self.vlm: VLMBackbone | None = None
        self.vision = self.language = self.projector = self.processor = None
        self.instruction_film = self.keypoint_logits = self.keypoint_readout = None
        self.image_tokens = 0
        if config.backbone is not None:
            if vlm is None:
                config.validate()
                vlm = VLMBackbone.load(config.backbone, config.processor_overrides, _lora(config))
            self.vlm = vlm
            config.head_hidden = config.head_hidden or vlm.hidden_size
            self.config = config.validate(check_backbones=False)
        else:
            self._build_composed(config, vision, language, tokenizer)
        self.latent_head: MLPHead | None = None
        self.action_head: MLPHead | None = None
        self.action_bins: ActionBins | None = None
        self._build_heads()
        if action_bins is not None:
            self.set_action_bins(action_bins)
        self._apply_freezing()
        self.load_report: LoadReport | None = None

    def _build_composed(self, config: VLAConfig, vision: nn.Module | None, language: nn.Module | None,
                        tokenizer) -> None:
        """Vision encoder + projector + language model (+ FiLM, keypoints) as the config names them."""
        if vision is None or language is None or tokenizer is None:
            config.validate()
        if tokenizer is None:
            tok_name = config.tokenizer or (BYTE_TOKENIZER if config.language_backbone == TINY
                                            else config.language_backbone)
            tokenizer = load_tokenizer(tok_name)
            config.tokenizer = tok_name
        else:
            tokenizer = prepare_tokenizer(tokenizer, "given")
        self.vision = vision if vision is not None else load_vision(config.vision_backbone, config.vision_overrides)
        check_vision(self.vision, config.vision_backbone)
        self.language = language if language is not None else \
            load_language(config.language_backbone, config.language_overrides, len(tokenizer))
        vocab = self.language.get_input_embeddings().num_embeddings
        if len(tokenizer) > vocab:
            raise VLABuildError(f"the tokenizer has {len(tokenizer)} tokens but the language backbone's embedding "
                                f"table only {vocab}: use the backbone's own tokenizer")

        check_sequence_length(self.vision, self.language, config.max_text_tokens)
        vision_dim = int(self.vision.config.hidden_size)
        lm_dim = int(self.language.get_input_embeddings().embedding_dim)
        if config.image_mean is None or config.image_std is None:
            mean, std = default_normalisation(self.vision, config.vision_backbone)
            config.image_mean = config.image_mean or mean
            config.image_std = config.image_std or std
        config.projector_hidden = config.projector_hidden or lm_dim
        config.head_hidden = config.head_hidden or lm_dim
        size = self.vision.config.image_size
        self.image_size = (int(size), int(size)) if isinstance(size, int) else tuple(int(v) for v in size)
        self.processor = VLAProcessor.from_config(config, tokenizer, self.image_size)
        self.config = config.validate(check_backbones=False)
        self.projector = nn.Sequential(nn.Linear(vision_dim, config.projector_hidden), nn.GELU(),
                                       nn.Linear(config.projector_hidden, lm_dim))
        for m in self.projector:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        if config.vision_film:
            channels = getattr(self.vision, "film_channels", None)
            if channels is None:
                raise VLABuildError(f"vision_film needs the built-in tiny vision tower (vision_backbone 'tiny'); "
                                    f"{config.vision_backbone!r} has no FiLM-conditioned layers")
            self.instruction_film = nn.Linear(lm_dim, 2 * sum(channels))
            nn.init.zeros_(self.instruction_film.weight)  # starts as the unconditioned tower
            nn.init.zeros_(self.instruction_film.bias)
        if config.keypoints:
            with torch.no_grad():  # how many tokens this vision tower makes (class token or not)
                probe = torch.zeros(1, 3, *self.image_size, dtype=next(self.vision.parameters()).dtype)
                self.image_tokens = int(self.vision(pixel_values=probe).last_hidden_state.shape[1])
            side = int(round(self.image_tokens ** 0.5))
            if side * side != self.image_tokens:
                raise VLABuildError(f"keypoints need a square grid of image tokens; this vision tower makes "
                                    f"{self.image_tokens} (a class token?)")
            ys, xs = torch.meshgrid(torch.linspace(-1, 1, side), torch.linspace(-1, 1, side), indexing="ij")
            self.register_buffer("token_grid", torch.stack([xs.flatten(), ys.flatten()], dim=1), persistent=False)
            self.keypoint_logits = nn.Linear(lm_dim, config.keypoints)
            self.keypoint_readout = nn.Linear(2 * config.keypoints, lm_dim)

    # ---- sizes and parts -----------------------------------------------------------------
    @property
    def config(self) -> VLAConfig:
        return self.__dict__["_config"]

    @config.setter
    def config(self, config: VLAConfig) -> None:
        self.__dict__["_config"] = config
        if self.processor is not None:  # the processor reads instructions as the config says
            self.processor.prompt_template = config.prompt_template
            self.processor.max_text_tokens = config.max_text_tokens

    @property
    def tokenizer(self):
        return self.vlm.tokenizer if self.vlm is not None else self.processor.tokenizer

    @property
    def head(self) -> str:
        return self.config.head

    @property
    def hidden_size(self) -> int:
        if self.vlm is not None:
            return self.vlm.hidden_size
        return int(self.language.get_input_embeddings().embedding_dim)

    @property
    def _head(self) -> MLPHead:
        return self.latent_head if self.latent_head is not None else self.action_head

    @property
    def device(self) -> torch.device:
        return self._head.net[1].weight.device

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
        # from the action bins (set_action_bins), for the regressed action
        self.register_buffer("bin_values", torch.zeros(ACTION_DIM, cfg.num_bins), persistent=False)
        self.register_buffer("bin_spread", torch.ones(ACTION_DIM), persistent=False)
        self.register_buffer("bin_center", torch.zeros(ACTION_DIM), persistent=False)
        self.register_buffer("bin_continuous", torch.zeros(ACTION_DIM, dtype=torch.bool), persistent=False)
        if self.action_bins is not None:
            self.set_action_bins(self.action_bins)

    def _apply_freezing(self) -> None:
        if self.vlm is not None:
            self.vlm.set_trainable(vision=not self.config.freeze_vision, language=not self.config.freeze_language)
        else:
            self.vision.requires_grad_(not self.config.freeze_vision)
            self.language.requires_grad_(not self.config.freeze_language)
        self.train(self.training)

    def train(self, mode: bool = True) -> "VLAModel":
        super().train(mode)
        if self.config.freeze_vision:  # frozen parts stay in eval mode (no dropout, fixed norms)
            for module in (self.vlm.vision_modules() if self.vlm is not None else [self.vision]):
                module.eval()
        if self.config.freeze_language:
            (self.vlm.model.get_submodule(self.vlm.family.language) if self.vlm is not None else self.language).eval()
        return self

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the transformers backbones' activations in the backward pass (train.gradient_checkpointing)."""
        if self.vlm is None and self.config.text_first:
            # the image tokens attend to the instruction through the LM's key/value cache, which
            # transformers' checkpointed layers drop in training
            raise ValueError("train.gradient_checkpointing does not work with model.text_first (the image tokens "
                             "read the instruction from the LM's cache); use it with text_first false or a VLM "
                             "backbone")
        modules = [self.vlm.model] if self.vlm is not None else [self.language, self.vision]
        for module in modules:
            if getattr(module, "supports_gradient_checkpointing", False):
                module.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def parameter_counts(self) -> dict[str, int]:
        heads = {"latent_head": self.latent_head, "action_head": self.action_head}
        if self.vlm is not None:
            return {**self.vlm.parameter_counts(),
                    **{k: sum(p.numel() for p in m.parameters()) for k, m in heads.items() if m is not None}}
        parts = {"vision": self.vision, "projector": self.projector, "language": self.language,
                 "instruction_film": self.instruction_film, "keypoint_logits": self.keypoint_logits,
                 "keypoint_readout": self.keypoint_readout, "latent_head": self.latent_head,
                 "action_head": self.action_head}
        return {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items() if m is not None}

    def set_action_bins(self, bins: ActionBins) -> None:
        """Attach the action bins (fitted on the finetuning data); they are saved with the model and
        mask head outputs beyond each dimension's effective bin count."""
        tables = action_bin_tables(bins, self.config.num_bins, self.config.action_spread_floor)
        self.action_bins = bins
        device = self.bin_mask.device
        for name, table in tables.items():
            setattr(self, name, table.to(device))

    # ---- inputs --------------------------------------------------------------------------
    def prepare_inputs(self, images: np.ndarray | torch.Tensor, instructions: Sequence[str]) -> dict[str, torch.Tensor]:
        """uint8 RGB images (B, H, W, 3) and B instructions -> the keyword inputs of forward, on the
        model's device: pixel_values, input_ids, attention_mask (and what a VLM's processor adds)."""
        if self.vlm is not None:
            return self.vlm.inputs(images, list(instructions), self.config.prompt_template, self.device,
                                   next(self.vlm.parameters()).dtype)
        ids, mask = self.tokenize(list(instructions))
        return {"pixel_values": self.preprocess_images(images), "input_ids": ids, "attention_mask": mask}

    def preprocess_images(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 RGB (B, H, W, 3) or (H, W, 3), numpy or torch -> normalised float (B, 3, h, w) at the
        vision encoder's size and dtype. Non-square images are center-cropped to a square first (as
        dataset ingest does), then resized (area averaging when shrinking, bilinear when growing)."""
        return self.processor.preprocess_images(images, dtype=self._vision_dtype())

    def _vision_dtype(self) -> torch.dtype:
        return next(self.vision.parameters()).dtype

    def prompts(self, instructions: Sequence[str]) -> list[str]:
        return self.processor.prompts(instructions)

    def tokenize(self, instructions: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Instructions -> (input_ids, attention_mask), both (B, T) int64, right-padded, at most
        max_text_tokens long, on the model's device."""
        return self.processor.tokenize(instructions)

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
                     attention_mask: torch.Tensor | None = None, **vlm_inputs: torch.Tensor) -> torch.Tensor:
        """The LM's final hidden state at the last non-pad position of [image tokens; text] (or, with
        config.text_first, [text; image tokens]) (B, D), plus, with config.keypoints, where the image
        tokens' final states put each keypoint. With a VLM backbone: its own sequence (vlm_inputs are
        what its processor adds, e.g. pixel_attention_mask)."""
        if self.vlm is not None:
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            return self.vlm.final_hidden({"pixel_values": pixel_values, "input_ids": input_ids,
                                          "attention_mask": attention_mask, **vlm_inputs})
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
        if self.keypoint_logits is not None:  # + where each keypoint's softmax over the tokens puts it
            weights = self.keypoint_logits(hidden[:, image]).softmax(dim=1)  # (B, N, K)
            where = torch.einsum("bnk,nc->bkc", weights, self.token_grid.to(weights.dtype))  # (B, K, 2)
            out = out + self.keypoint_readout(where.flatten(1))
        return out

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                actions: torch.Tensor | np.ndarray | None = None, **vlm_inputs: torch.Tensor) -> VLAOutput:
        """pixel_values (B, 3, h, w) from preprocess_images; input_ids / attention_mask (B, T) from
        tokenize; labels (optional): latent head (B, L) token ids in [0, |C|); action head (B, k, 7)
        (or (B, 7) when k = 1) bin ids; IGNORE_INDEX (-100) positions are skipped. actions (optional,
        with labels, action head): the true actions the labels were encoded from, same shape, NaN
        where unknown; the regression head is trained on them (else on the labels' bin values). With a
        VLM backbone, prepare_inputs gives the inputs (vlm_inputs: what its processor adds)."""
        h = self.final_hidden(pixel_values, input_ids, attention_mask, **vlm_inputs)
        h = h.to(self._head.net[1].weight.dtype)
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

    def decode_actions(self, out: VLAOutput) -> np.ndarray:
        """An action-head output -> (B, k, 7) float32 actions: the bins head's argmax bins' values; the
        regression head's values on the continuous dimensions, the nearest bin's on the others."""
        if self.action_bins is None:
            raise RuntimeError("this model has no action bins (set_action_bins): cannot turn bins into actions")
        actions = self.action_bins.decode(out.predictions.detach().cpu().numpy())
        if self.config.action_head_type != "regression":
            return actions
        values = self.regressed_actions(out.logits.detach())
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
                        attention_mask: torch.Tensor | None = None, **vlm_inputs: torch.Tensor
                        ) -> tuple[np.ndarray, np.ndarray]:
        """-> (bin ids (B, k, 7) int64, actions (B, k, 7) float32 as decode_actions reads them)."""
        if self.action_head is None:
            raise RuntimeError("this model has a latent-action head, not an action head: finetune it first")
        if self.action_bins is None:
            raise RuntimeError("this model has no action bins (set_action_bins): cannot turn bins into actions")
        out = self.forward(pixel_values, input_ids, attention_mask, **vlm_inputs)
        return out.predictions.cpu().numpy(), self.decode_actions(out)

    @torch.inference_mode()
    def predict_latent(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor | None = None, **vlm_inputs: torch.Tensor) -> torch.Tensor:
        """Latent-action tokens (B, L) int64."""
        if self.latent_head is None:
            raise RuntimeError("this model has an action head, not a latent-action head")
        return self.forward(pixel_values, input_ids, attention_mask, **vlm_inputs).predictions

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
        device, dtype = self.device, self._head.net[1].weight.dtype
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
        if self.vlm is not None:
            return {"policy_type": POLICY_TYPE, **self.config.to_dict(), "backbones": {"vlm": self.vlm.config_dict()}}
        return {"policy_type": POLICY_TYPE, **self.config.to_dict(),
                "backbones": {"vision": backbone_config_dict(self.vision),
                              "language": backbone_config_dict(self.language)}}

    def save_pretrained(self, directory: str | Path, *, optimizer: torch.optim.Optimizer | None = None,
                        scheduler: Any = None, step: int = 0, extra: dict | None = None, **gathered) -> Path:
        """Write a self-contained checkpoint (weights incl. frozen vision, config + backbone configs,
        tokenizer, action bins), atomically; with `optimizer` (+ `scheduler`) also the trainer state
        that ``lapa_training.checkpoint.load_trainer_state`` restores. `gathered`: a sharded run's
        whole tensors (save_checkpoint's state_dict, optimizer_state)."""
        def write_files(dest: Path) -> None:
            if self.vlm is not None:
                self.vlm.save_processor(dest)
            else:
                self.tokenizer.save_pretrained(str(dest / TOKENIZER_DIR))
            if self.action_bins is not None:
                self.action_bins.save(dest / BINS_FILE)

        from lapa_training.checkpoint import save_checkpoint

        return save_checkpoint(directory, self, self.checkpoint_config(), optimizer=optimizer, scheduler=scheduler,
                               step=step, extra=extra, write_files=write_files, **gathered)

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, config: VLAConfig | None = None, replace_heads: bool = False,
                        map_location: str | torch.device = "cpu") -> "VLAModel":
        """Load a checkpoint written by save_pretrained (no download).

        config: with replace_heads=False, it must match the saved config except training-only keys
        (freeze_*, control_rate), which it then sets. replace_heads=True: keep vision, projector and
        LM, drop the saved head and build a fresh one for `config` (default: the saved config's
        ``finetune()``); `config` may then also differ in head keys. ``model.load_report`` lists
        the loaded, new and dropped keys."""
        from lapa_training.checkpoint import CheckpointError, load_checkpoint

        state, saved, _ = load_checkpoint(directory, device=str(map_location))
        path = _resolved(directory)
        backbones = saved.get("backbones")
        if not isinstance(backbones, dict) or not ({"vision", "language"} <= set(backbones) or "vlm" in backbones):
            raise CheckpointError(f"{path}/config.json has no backbone configs: not a VLA checkpoint written by "
                                  f"VLAModel.save_pretrained")
        try:
            saved_config = _saved_config(saved)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"checkpoint {path} does not hold a valid VLA config: {e}") from e
        bins = _saved_bins(path)
        if "vlm" in backbones:
            if not (path / PROCESSOR_DIR).is_dir():
                raise CheckpointError(f"checkpoint {path} has no {PROCESSOR_DIR}/ directory")
            vlm = VLMBackbone.from_saved(backbones["vlm"], path / PROCESSOR_DIR, str(path), _lora(saved_config))
            model = cls(saved_config, vlm=vlm, action_bins=bins)
            return model._finish_loading(state, path, saved_config, config, replace_heads, map_location)
        if not (path / TOKENIZER_DIR).is_dir():
            raise CheckpointError(f"checkpoint {path} has no {TOKENIZER_DIR}/ directory")
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path / TOKENIZER_DIR))
        except Exception as e:
            raise CheckpointError(f"cannot read the tokenizer of {path}: {e}") from e
        vision = backbone_from_config_dict(backbones["vision"], "vision")
        language = backbone_from_config_dict(backbones["language"], "language")
        model = cls(saved_config, vision=vision, language=language, tokenizer=tokenizer, action_bins=bins)
        return model._finish_loading(state, path, saved_config, config, replace_heads, map_location)

    def _finish_loading(self, state: dict[str, torch.Tensor], path: Path, saved_config: VLAConfig,
                        config: VLAConfig | None, replace_heads: bool, map_location) -> "VLAModel":
        """The saved weights into this freshly built model, then heads replaced or the config set as asked."""
        from lapa_training.checkpoint import check_config_compatible, load_model_state

        model = self
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

        config = _saved_config(json.loads((_resolved(pretrained) / CONFIG_FILE).read_text())).finetune(**overrides)
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


def _saved_bins(path: Path) -> ActionBins | None:
    from lapa_training.checkpoint import CheckpointError

    if not (path / BINS_FILE).is_file():
        return None
    try:
        return ActionBins.load(path / BINS_FILE)
    except ValueError as e:
        raise CheckpointError(str(e)) from e


def _lora(config: VLAConfig) -> dict[str, Any]:
    return {"rank": config.lora_rank, "alpha": float(config.lora_alpha), "dropout": float(config.lora_dropout)}


def _saved_config(saved: dict[str, Any]) -> VLAConfig:
    """A checkpoint's config.json dict (any version) -> its VLAConfig."""
    d = {k: v for k, v in migrate_vla_config(saved).items() if k not in ("policy_type", "backbones")}
    return VLAConfig.from_dict(d, check_backbones=False)


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
