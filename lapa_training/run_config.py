"""Training-run settings: a YAML file of sections (``model``, ``train``, ``data``, ...) plus
``--set section.key=value`` overrides from the command line.

    model:                 # the model's config: a preset, then fields that override it
      preset: tiny
      dim: 192
    train:                 # lapa_training.trainer.TrainConfig
      steps: 3000
      lr: 1.0e-3
    data:                  # what the job reads (job-specific keys)
      window_frames: null

Values of overrides are parsed as YAML (``--set train.lr=3e-4``, ``--set model.action_grid=[2,2]``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml


class RunConfigError(ValueError):
    """A settings file or override the user has to fix; the message says where."""


def load_run_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = (),
                    sections: tuple[str, ...] = ("model", "train", "data")) -> dict[str, dict[str, Any]]:
    """{section: {key: value}} from the file (if any) with the overrides applied, every section present."""
    config: dict[str, dict[str, Any]] = {name: {} for name in sections}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RunConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise RunConfigError(f"{path} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise RunConfigError(f"{path}: expected a mapping of sections ({', '.join(sections)})")
        for name, values in loaded.items():
            if name not in sections:
                raise RunConfigError(f"{path}: unknown section {name!r}; sections are {', '.join(sections)}")
            if values is None:
                continue
            if not isinstance(values, dict):
                raise RunConfigError(f"{path}: section {name!r} must be a mapping of settings")
            config[name].update(_numbers(values))
    for item in overrides:
        key, sep, text = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise RunConfigError(f"--set {item!r}: expected section.key=value, e.g. train.lr=3e-4")
        if section not in sections:
            raise RunConfigError(f"--set {item!r}: unknown section {section!r}; sections are {', '.join(sections)}")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        config[section][name] = _numbers(value)
    return config


_EXPONENT_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def _numbers(value: Any) -> Any:
    """YAML 1.1 reads 3e-4 (no dot) as a string; a setting written so means the number."""
    if isinstance(value, str) and _EXPONENT_FLOAT.match(value.strip()):
        return float(value)
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    return value
