"""Any saved LAQ, ours (LAQModel) or the LAPA release's converted one (OfficialLAQModel), by the
model_type its config.json names. Both give labelling and evaluation the same calls: encode, decode,
config.image_size / num_tokens / codebook_size / window_s / channels, num_parameters."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lapa_training.checkpoint import CONFIG_FILE, CheckpointError, resolve_checkpoint
from lapa_training.laq import configuration_laq, configuration_official_laq


def load_laq(directory: str | Path, map_location: str | torch.device = "cpu"):
    path = resolve_checkpoint(directory)
    try:
        model_type = json.loads((path / CONFIG_FILE).read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"cannot read {path / CONFIG_FILE}: {e}") from e
    if model_type == configuration_official_laq.MODEL_TYPE:
        from lapa_training.laq.modeling_official_laq import OfficialLAQModel

        return OfficialLAQModel.from_pretrained(path, map_location=map_location)
    if model_type == configuration_laq.MODEL_TYPE:
        from lapa_training.laq.modeling_laq import LAQModel

        return LAQModel.from_pretrained(path, map_location=map_location)
    raise CheckpointError(f"{path} holds a {model_type!r} model, not a LAQ ('{configuration_laq.MODEL_TYPE}' or "
                          f"'{configuration_official_laq.MODEL_TYPE}')")
