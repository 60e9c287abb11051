"""Configuration of the LAPA vision-language-action model (stages 2 and 3 of LAPA).

One dataclass, JSON round-trippable, checked by ``validate()`` with messages that say what to change.

The model is a vision encoder (frozen by default, as in the paper) and a causal language model
joined by an MLP projector; the LM's final hidden state feeds one head:

- ``objective`` says what the model was (or is being) pretrained on:
  "latent" (LAPA: LAQ's latent-action tokens), "action" (the ACTIONVLA baseline: true actions),
  "idm" (the VPT baseline: pseudo-actions an inverse-dynamics model labelled);
- ``stage`` is "pretrain" or "finetune".

Pretraining with objective "latent" uses the latent-action head (L x |C| logits); everything else
(objective "action"/"idm" pretraining, and every finetuning) uses the action head (chunk_size x 7 x
num_bins logits). ``finetune()`` gives the config of the finetuning model for a pretrained one.

Backbones are named by ``vision_backbone`` / ``language_backbone``: "tiny" (built in code from
code, nothing downloaded: a small CNN vision tower and a Qwen2 LM, see TINY_VISION /
TINY_LANGUAGE) or a Hugging Face model id ("org/name") or local directory, loaded
with ``from_pretrained``. ``vision_overrides`` / ``language_overrides`` are passed to the backbone
configs (for "tiny": applied on top of the built-in ones). A saved VLA checkpoint stores the
resolved backbone configs and the tokenizer, so loading it never downloads.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any
from lapa_training.dataclass_dict import dataclass_kwargs

MODEL_TYPE = "lapa_vla"
POLICY_TYPE = "lapa_vla"
TINY = "tiny"
BYTE_TOKENIZER = "byte"
OBJECTIVES = ("latent", "action", "idm")
STAGES = ("pretrain", "finetune")
ACTION_HEAD_TYPES = ("bins", "regression")

# The built-in tiny backbones (CPU demo and tests); overrides are applied on top.
# The tiny vision tower is a small CNN with coordinate channels (lapa_training/vla/tiny_vision.py).
TINY_VISION: dict[str, Any] = dict(image_size=64, hidden_size=64, channels=[32, 64, 64], grid=8)
TINY_LANGUAGE: dict[str, Any] = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                     tie_word_embeddings=False)

# Keys that change how a model trains or runs but not its weights.
TRAINING_ONLY_KEYS = ("freeze_vision", "freeze_language", "control_rate", "zero_init_head")
# Keys that only shape the heads: a checkpoint loaded with its heads replaced may differ in these.
HEAD_KEYS = ("objective", "stage", "latent_tokens", "codebook_size", "num_bins", "chunk_size", "head_hidden",
             "action_head_type", "action_spread_floor")
# Keys whose None means "whatever the backbones say", resolved when the model is built.
RESOLVED_KEYS = ("tokenizer", "image_mean", "image_std", "projector_hidden", "head_hidden")

# Options measured not to help and removed (docs/DECISIONS.md): key -> (its values that meant "off",
# why it went). A config or checkpoint that still holds one is accepted at an off value and refused
# otherwise.
REMOVED_KEYS: dict[str, tuple[Any, str]] = {
    "spatial_readout": (0, "superseded by keypoints"),
    "expectation_loss": (0.0, "measured not to help"),
    "action_decoding": ("argmax", "measured not to help; actions are read by argmax"),
}
# What a checkpoint written before a key existed meant by its absence (the behaviour it was trained with).
SAVED_BEFORE_KEY: dict[str, Any] = {
    "text_first": False,
    "keypoints": 0,
    "action_head_type": "bins",
    "vision_film": False,
    "zero_init_head": False,
    "action_spread_floor": [0.0, 0.0],  # each dimension's own spread
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@dataclass
class VLAConfig:
    # a pretrained vision-language model (hub id or directory, e.g. "HuggingFaceTB/SmolVLM-500M-Instruct"):
    # its vision tower, connector, LM, processor and prompt format replace the three fields below
    # (lapa_training/vla/vlm_backbone.py); None: vision encoder + language model + a fresh projector
    backbone: str | None = None
    processor_overrides: dict[str, Any] = field(default_factory=dict)  # AutoProcessor kwargs (backbone)
    lora_rank: int = 0  # > 0 (backbone): LoRA adapters of this rank train instead of the LM's weights
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    vision_backbone: str = TINY  # "tiny", a Hugging Face id ("google/siglip-base-patch16-224") or a directory
    language_backbone: str = TINY  # "tiny", a Hugging Face id ("Qwen/Qwen2.5-0.5B") or a directory
    tokenizer: str | None = None  # None: the language backbone's ("byte" for tiny); "byte", an id or a directory
    vision_overrides: dict[str, Any] = field(default_factory=dict)
    language_overrides: dict[str, Any] = field(default_factory=dict)
    freeze_vision: bool = True  # as in the paper: the vision encoder is not trained
    freeze_language: bool = False
    projector_hidden: int | None = None  # None: the LM's hidden size
    head_hidden: int | None = None  # None: the LM's hidden size
    # True: the instruction comes before the image tokens, so the image tokens' LM states can depend
    # on it (which block is asked for); False: image first, as in the paper (image states are then
    # the same whatever the instruction, and only the last token's state is language-conditioned)
    text_first: bool = False
    # > 0: a spatial softmax over the image tokens' final LM states: this many keypoints, each the
    # expected grid position under its own softmax over the tokens; the head also reads their
    # coordinates (docs/DECISIONS.md)
    keypoints: int = 0
    # True: the instruction scales and shifts every conv layer of the tiny vision tower (FiLM, as in
    # RT-1), from the LM's final state over the instruction alone, so the tower can look for what the
    # instruction names; needs vision_backbone "tiny". False: the image is encoded without the
    # instruction, as in the paper (docs/DECISIONS.md)
    vision_film: bool = False
    objective: str = "latent"  # what the backbone is pretrained on: latent | action | idm
    stage: str = "pretrain"  # pretrain | finetune
    latent_tokens: int = 4  # L, latent-action tokens per step (LAQ's action grid, 2x2)
    codebook_size: int = 8  # |C|, LAQ's codebook size
    num_bins: int = 256  # action-head outputs per action dimension (action_head_type "bins")
    # what the action head predicts per action dimension: "bins" (as in the paper: a categorical over
    # num_bins equal-frequency bins, cross-entropy) or "regression" (one value per dimension, in units
    # of the training actions' spread, squared error; a binary gripper is read as the nearest of its
    # two values; at this scale the bins head underfits where regression fits, docs/DECISIONS.md).
    # The action bins are fitted either way: they hold the normalisation and the gripper's values,
    # and give the regression head's predictions a bin id for the accuracy metrics
    action_head_type: str = "bins"
    # (m, rad) per step, the actions' unit: the least spread a translation / rotation dimension is
    # measured in (at 10 Hz, 1 mm is 1 cm/s and 5 mrad is 0.05 rad/s). The regression head weighs
    # each dimension's error in units of its spread; a dimension that barely varies (roll and pitch
    # of an arm that keeps its gripper pointing down: tracking noise) would otherwise weigh as much as
    # x, y and z, and the model spends itself fitting noise (docs/DECISIONS.md). (0, 0): each
    # dimension's own spread
    action_spread_floor: tuple[float, float] = (0.001, 0.005)
    chunk_size: int = 1  # future steps the action head predicts at once (action chunking)
    # True: a freshly built head's output layer starts at zero, so a regression head starts by
    # predicting the training mean and its first steps do not shrink the backbone's features to
    # cancel random outputs (ACTIONVLA's plateau at the mean action, docs/DECISIONS.md); False: small
    # random weights (std 0.02), as for every other layer
    zero_init_head: bool = False
    image_mean: tuple[float, float, float] | None = None  # None: the vision backbone's (0.5 for tiny)
    image_std: tuple[float, float, float] | None = None
    prompt_template: str = "{instruction}"
    max_text_tokens: int = 64  # instructions are cut to this many tokens (composed backbones; a VLM's prompt is not cut)
    control_rate: float = 10.0  # Hz of the actions (metadata for the policy)

    def __post_init__(self):
        for name in ("image_mean", "image_std", "action_spread_floor"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, bytes)):
                try:
                    setattr(self, name, tuple(float(v) for v in value))
                except (TypeError, ValueError):
                    pass  # validate() reports it
        for name in ("vision_overrides", "language_overrides", "processor_overrides"):
            value = getattr(self, name)
            if value is None or isinstance(value, dict):
                setattr(self, name, dict(value or {}))  # own copy; anything else is reported by validate()

    # ---- derived -------------------------------------------------------------------------
    @property
    def head(self) -> str:
        """The active head: "latent" for latent pretraining, "action" otherwise."""
        return "latent" if self.stage == "pretrain" and self.objective == "latent" else "action"

    @property
    def action_dim(self) -> int:
        return 7

    # ---- checks --------------------------------------------------------------------------
    def validate(self, check_backbones: bool = True) -> "VLAConfig":
        """Raise ValueError naming the first inconsistent setting; return self when all is well.

        check_backbones=False skips checking that backbone/tokenizer names are 'tiny', an existing
        directory or a hub id: for configs read from a checkpoint, where those names are only the
        provenance (the checkpoint holds the backbones) and the source directory may be gone."""
        for name in ("vision_backbone", "language_backbone"):
            _check_backbone_name(name, getattr(self, name), exists=check_backbones)
        if self.backbone is not None:
            _check_backbone_name("backbone", self.backbone, exists=check_backbones)
            for name, off in (("vision_film", False), ("keypoints", 0), ("text_first", False)):
                if getattr(self, name) != off:
                    raise ValueError(f"VLAConfig.{name} is for the tiny composed backbones; with a VLM backbone "
                                     f"({self.backbone}) leave it at {off!r}")
        if not _is_int(self.lora_rank) or self.lora_rank < 0:
            raise ValueError(f"VLAConfig.lora_rank must be an integer >= 0 (0 = off), got {self.lora_rank!r}")
        if self.lora_rank and self.backbone is None:
            raise ValueError("VLAConfig.lora_rank needs a VLM backbone (VLAConfig.backbone)")
        if self.lora_rank and self.freeze_language:
            raise ValueError("VLAConfig.lora_rank trains adapters on the language model: set freeze_language false")
        if not isinstance(self.lora_alpha, (int, float)) or not self.lora_alpha > 0:
            raise ValueError(f"VLAConfig.lora_alpha must be positive, got {self.lora_alpha!r}")
        if not isinstance(self.lora_dropout, (int, float)) or not 0 <= self.lora_dropout < 1:
            raise ValueError(f"VLAConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.tokenizer is not None and self.tokenizer != BYTE_TOKENIZER:
            _check_backbone_name("tokenizer", self.tokenizer, exists=check_backbones,
                                 extra=f"'{BYTE_TOKENIZER}' (the built-in byte-level tokenizer), ")
        for name in ("vision_overrides", "language_overrides", "processor_overrides"):
            value = getattr(self, name)
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                raise ValueError(f"VLAConfig.{name} must be a dict of backbone config keys, got {value!r}")
            try:
                json.dumps(value)
            except TypeError as e:
                raise ValueError(f"VLAConfig.{name} must be JSON-serialisable: {e}") from None
        for name in ("freeze_vision", "freeze_language", "text_first", "vision_film", "zero_init_head"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"VLAConfig.{name} must be true or false, got {getattr(self, name)!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"VLAConfig.objective must be one of {', '.join(OBJECTIVES)} (latent = LAPA, "
                             f"action = ACTIONVLA baseline, idm = VPT baseline), got {self.objective!r}")
        if self.stage not in STAGES:
            raise ValueError(f"VLAConfig.stage must be one of {', '.join(STAGES)}, got {self.stage!r}")
        for name in ("latent_tokens", "max_text_tokens"):
            _positive_int(name, getattr(self, name))
        for name in ("projector_hidden", "head_hidden"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        if not _is_int(self.keypoints) or self.keypoints < 0:
            raise ValueError(f"VLAConfig.keypoints must be an integer >= 0 (0 = off), got {self.keypoints!r}")
        if not _is_int(self.codebook_size) or self.codebook_size < 2:
            raise ValueError(f"VLAConfig.codebook_size must be an integer >= 2 (LAQ's |C|), got "
                             f"{self.codebook_size!r}")
        if not _is_int(self.num_bins) or self.num_bins < 2:
            raise ValueError(f"VLAConfig.num_bins must be an integer >= 2 (bins per action dimension), got "
                             f"{self.num_bins!r}")
        if not _is_int(self.chunk_size) or self.chunk_size < 1:
            raise ValueError(f"VLAConfig.chunk_size must be an integer >= 1 (1 = no action chunking), got "
                             f"{self.chunk_size!r}")
        if self.action_head_type not in ACTION_HEAD_TYPES:
            raise ValueError(f"VLAConfig.action_head_type must be one of {', '.join(ACTION_HEAD_TYPES)}, got "
                             f"{self.action_head_type!r}")
        floor = self.action_spread_floor
        if not isinstance(floor, tuple) or len(floor) != 2 or not all(isinstance(v, float) and 0 <= v < float("inf")
                                                                      for v in floor):
            raise ValueError(f"VLAConfig.action_spread_floor must be 2 numbers >= 0 (translation m, rotation "
                             f"rad, per step), got {floor!r}")
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, tuple) or len(value) != 3 or not all(isinstance(v, float) for v in value):
                raise ValueError(f"VLAConfig.{name} must be 3 numbers (R, G, B) or null, got {value!r}")
        if self.image_std is not None and not all(v > 0 for v in self.image_std):
            raise ValueError(f"VLAConfig.image_std must be positive, got {self.image_std}")
        if not isinstance(self.prompt_template, str) or "{instruction}" not in self.prompt_template:
            raise ValueError(f"VLAConfig.prompt_template must contain '{{instruction}}', got "
                             f"{self.prompt_template!r}")
        try:
            self.prompt_template.format(instruction="x")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"VLAConfig.prompt_template {self.prompt_template!r} has a placeholder other than "
                             f"{{instruction}} ({e}); write literal braces as {{{{ }}}}") from None
        if not isinstance(self.control_rate, (int, float)) or not self.control_rate > 0:
            raise ValueError(f"VLAConfig.control_rate must be positive (Hz of the actions), got {self.control_rate!r}")
        return self

    # ---- presets -------------------------------------------------------------------------
    @classmethod
    def tiny(cls, image_size: int = 64, **overrides) -> "VLAConfig":
        """The recipe that learns at CPU scale (the demo's): the built-in tiny CNN vision tower (a 4x4
        grid of tokens of width 64 from an image_size image), FiLM-conditioned on the instruction,
        + tiny Qwen2 (width 128, 2 layers) reading the instruction before the image + byte-level
        tokenizer; 16 keypoints and a regression action head. Each choice: docs/DECISIONS.md.

        Unlike the paper, the vision tower is trained (freeze_vision=False): the paper freezes a
        *pretrained* encoder, and a frozen random tower only limits what the VLA can see."""
        if not _is_int(image_size) or image_size < 8 or image_size % 8:
            raise ValueError(f"VLAConfig.tiny: image_size must be a multiple of 8, got {image_size!r}")
        overrides = drop_removed_keys(overrides)
        vision = {"image_size": image_size, "grid": 4, **overrides.pop("vision_overrides", {})}
        return cls(**{**dict(vision_backbone=TINY, language_backbone=TINY, vision_overrides=vision,
                             freeze_vision=False, prompt_template="{instruction}", max_text_tokens=64,
                             action_head_type="regression", text_first=True, vision_film=True, keypoints=16,
                             action_spread_floor=(0.001, 0.005)),
                      **overrides}).validate()

    @classmethod
    def paper(cls, **overrides) -> "VLAConfig":
        """A paper-sized VLA on public backbones: SigLIP-base (224 px, frozen) + Qwen2.5-0.5B.

        The LAPA paper builds on LWM-Chat-1M (a 7B LLaMA-2 world model with a VQGAN image
        tokenizer); this is the same recipe (frozen vision, trained LM, latent head then action
        head) at a size one GPU finetunes. Loading it downloads the backbones."""
        overrides = drop_removed_keys(overrides)
        return cls(**{**dict(vision_backbone="google/siglip-base-patch16-224",
                             language_backbone="Qwen/Qwen2.5-0.5B",
                             prompt_template="In: What action should the robot take to {instruction}?\nOut:",
                             max_text_tokens=96), **overrides}).validate()

    @classmethod
    def vlm(cls, **overrides) -> "VLAConfig":
        """A pretrained vision-language model (``backbone``) under the paper's recipe: its vision tower
        frozen, its connector and language model trained, the final state read by the heads. The named
        presets (config/train/presets/) set the backbone and its training settings."""
        overrides = drop_removed_keys(overrides)
        if not overrides.get("backbone"):
            raise ValueError("the vlm preset needs model.backbone: a Hugging Face id or directory of a VLM")
        return cls(**{**dict(prompt_template="What action should the robot take to {instruction}?"),
                      **overrides}).validate()

    def finetune(self, **overrides) -> "VLAConfig":
        """The config of the finetuning model for this (pretrained) one: stage finetune, action head."""
        return replace(self, **{"stage": "finetune", **drop_removed_keys(overrides)}).validate(check_backbones=False)

    # ---- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for name in ("image_mean", "image_std", "action_spread_floor"):
            d[name] = None if d[name] is None else list(d[name])
        return {"model_type": MODEL_TYPE, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any], check_backbones: bool = True) -> "VLAConfig":
        d = drop_removed_keys(d)
        return cls(**dataclass_kwargs(cls, d, "VLAConfig keys", model_type=MODEL_TYPE)).validate(check_backbones)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "VLAConfig":
        return cls.from_dict(json.loads(text))


# ---------------------------------------------------------------------------------------------
# removed options and older checkpoints
# ---------------------------------------------------------------------------------------------
def drop_removed_keys(d: dict[str, Any]) -> dict[str, Any]:
    """A copy of config dict `d` without the removed options it holds at their off values; a removed
    option asked for (e.g. spatial_readout 16) raises ValueError saying so in one line."""
    d = dict(d)
    for key, (off, why) in REMOVED_KEYS.items():
        if key in d and not _is_off(d[key], off):
            raise ValueError(f"VLAConfig.{key} was removed ({why}, docs/DECISIONS.md): only its off value "
                             f"{off!r} is accepted, got {d[key]!r}")
        d.pop(key, None)
    return d


def migrate_vla_config(saved: dict[str, Any]) -> dict[str, Any]:
    """A VLA checkpoint's config.json dict, as any earlier version wrote it -> one today's VLAConfig
    reads, keeping the behaviour it was trained with: keys added since are filled with what their
    absence meant (SAVED_BEFORE_KEY), removed options are dropped at their off values and refused
    otherwise (ValueError). Other entries (policy_type, backbones) pass through unchanged."""
    d = drop_removed_keys(saved)
    for key, value in SAVED_BEFORE_KEY.items():
        d.setdefault(key, value)
    return d


def _is_off(value: Any, off: Any) -> bool:
    """Whether a removed option's value is the one that meant "off" (null and false count as off)."""
    if value is None or value is False:
        return True
    return not isinstance(value, bool) and value == off


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _positive_int(name: str, value) -> None:
    if not _is_int(value) or value <= 0:
        raise ValueError(f"VLAConfig.{name} must be a positive integer, got {value!r}")


def looks_like_path(name: str) -> bool:
    """Whether a backbone name is meant as a directory rather than a Hugging Face id 'org/name'."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def _check_backbone_name(field_name: str, name, exists: bool = True, extra: str = "") -> None:
    """'tiny', an existing directory, or something shaped like a Hugging Face id 'org/name'."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"VLAConfig.{field_name} must be a non-empty string, got {name!r}")
    if field_name != "tokenizer" and name == TINY or not exists:
        return
    if Path(name).expanduser().is_dir():
        return
    if looks_like_path(name):
        raise ValueError(f"VLAConfig.{field_name} {name!r} looks like a path but no such directory exists")
    if not _HUB_ID.match(name):
        choices = f"'{TINY}' (built in), " if field_name != "tokenizer" else ""
        raise ValueError(f"VLAConfig.{field_name} {name!r} is not a known backbone: use {choices}{extra}"
                         f"a local directory holding a Hugging Face model, or a Hugging Face id of the form "
                         f"'org/name' (e.g. 'google/siglip-base-patch16-224', 'Qwen/Qwen2.5-0.5B')")
