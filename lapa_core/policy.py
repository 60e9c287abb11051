"""The one interface between a policy and the code that runs it, and how a checkpoint becomes a policy.

A policy is anything with ``reset(instruction)`` and ``act(image, instruction) -> PolicyStep``.
``load_policy(path)`` reads ``<path>/config.json`` and hands it to the loader registered for its
``policy_type``. Loaders come from ``register_policy_type`` or, so that this core never imports the
packages above it, from the ``lapa_ros.policy_types`` entry points (setup.py):

- ``"lapa_vla"``: the finetuned LAPA / baseline VLA (``lapa_training.vla.policy``);
- ``"constant"``: sends one fixed delta every step. For bring-up on a real arm (check the direction
  conventions at a crawl before a learned policy moves it) and for testing the safety path: it can
  raise or return NaN at a chosen step, or take a chosen time per step.

A policy that predicts several steps from one image (action chunking) also has ``chunk_size`` (> 1)
and ``act_chunk(image, instruction) -> (chunk_size, 7)``; its ``act`` hands the steps out one per call
and runs the model when they are used up. The policy server then predicts ahead while a chunk
executes (lapa_core.action_chunks).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np


@dataclass
class PolicyStep:
    delta: np.ndarray  # (7,) dx dy dz [m], droll dpitch dyaw [rad] per control step, gripper closure 0..1
    tokens: list[int] = field(default_factory=list)  # latent or action tokens behind this step
    token_kind: str = "action"  # "latent" or "action"


class Policy(Protocol):
    control_rate: float  # Hz the policy was trained at (its deltas are per 1 / control_rate seconds)

    def reset(self, instruction: str) -> None: ...

    def act(self, image: np.ndarray, instruction: str) -> PolicyStep: ...


class PolicyLoadError(ValueError):
    """The checkpoint is missing, unreadable or of an unknown kind; the message names the file."""


class ConstantPolicy:
    """Always the same delta (see module doc); fault injection for safety tests.

    With chunk_size k > 1 it stands in for a chunked model: each prediction (act_chunk, or the act
    call that finds its queue empty) takes seconds_per_step and returns k copies of the delta;
    raise_at_step and nan_at_step then count predictions."""

    def __init__(self, delta, control_rate: float = 10.0, raise_at_step: int = 0, nan_at_step: int = 0,
                 seconds_per_step: float = 0.0, chunk_size: int = 1):
        if not isinstance(delta, (list, tuple, np.ndarray)) or len(delta) != 7 or \
                not all(_is_number(v) and np.isfinite(v) for v in delta):
            raise PolicyLoadError(f"constant policy: 'delta' needs 7 finite numbers, got {delta!r}")
        self.delta = np.asarray(delta, dtype=float)
        self.control_rate = _checked_number("control_rate", control_rate, low=0.0, low_open=True, high=1000.0)
        self.raise_at_step = int(_checked_number("raise_at_step", raise_at_step, low=0, integer=True))
        self.nan_at_step = int(_checked_number("nan_at_step", nan_at_step, low=0, integer=True))
        self.seconds_per_step = _checked_number("seconds_per_step", seconds_per_step, low=0.0, high=60.0)
        self.chunk_size = int(_checked_number("chunk_size", chunk_size, low=1, high=1000, integer=True))
        self.steps = 0  # predictions made this episode
        self._queued = 0  # steps of the last prediction not yet handed out by act

    def reset(self, instruction: str) -> None:
        self.steps = self._queued = 0

    def act(self, image: np.ndarray, instruction: str) -> PolicyStep:
        if self._queued == 0:
            delta = self.act_chunk(image, instruction)[0]
            self._queued = self.chunk_size
        else:
            delta = self.delta.copy()
        self._queued -= 1
        return PolicyStep(delta=delta, tokens=[], token_kind="action")

    def act_chunk(self, image: np.ndarray, instruction: str) -> np.ndarray:
        """One prediction: (chunk_size, 7), each row the delta."""
        self.steps += 1
        if self.seconds_per_step:
            time.sleep(self.seconds_per_step)
        if self.steps == self.raise_at_step:
            raise RuntimeError(f"constant policy: injected failure at step {self.steps}")
        chunk = np.tile(self.delta, (self.chunk_size, 1))
        if self.steps == self.nan_at_step:
            chunk[0, 0] = np.nan
        return chunk

    @staticmethod
    def save(path: str | Path, delta, **options) -> Path:
        """Write a constant-policy 'checkpoint' (just config.json) that load_policy reads."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = {"policy_type": "constant", "delta": [float(v) for v in delta], **options}
        (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        return path


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _checked_number(name: str, value: Any, *, low: float, high: float = float("inf"), low_open: bool = False,
                    integer: bool = False) -> float:
    """value as a float, or a PolicyLoadError that names the setting and its range."""
    ok = _is_number(value) and np.isfinite(value) and (value > low if low_open else value >= low) and value <= high \
        and (not integer or float(value).is_integer())
    if not ok:
        bound = f"{'>' if low_open else '>='} {low:g}" + (f" and <= {high:g}" if high != float("inf") else "")
        raise PolicyLoadError(f"'{name}' must be {'an integer' if integer else 'a number'} {bound}, got {value!r}")
    return float(value)


# policy_type -> loader(checkpoint dir, its config.json as a dict) -> Policy
PolicyLoader = Callable[[Path, dict[str, Any]], Policy]
_LOADERS: dict[str, PolicyLoader] = {}
ENTRY_POINT_GROUP = "lapa_ros.policy_types"


def register_policy_type(name: str, loader: PolicyLoader) -> None:
    """Make ``load_policy`` hand checkpoints whose config.json says ``policy_type: name`` to loader."""
    _LOADERS[name] = loader


def _installed_policy_types() -> set[str]:
    from importlib.metadata import entry_points

    return {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}


def registered_policy_types() -> list[str]:
    """Every policy type load_policy knows: registered ones and those installed as entry points."""
    return sorted(set(_LOADERS) | _installed_policy_types())


def _loader(kind: str, path: Path) -> PolicyLoader | None:
    if kind in _LOADERS:
        return _LOADERS[kind]
    if kind not in _installed_policy_types():
        return None
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP, name=kind):
        try:
            _LOADERS[kind] = ep.load()
        except ImportError as e:
            raise PolicyLoadError(f"{path} is a {kind!r} checkpoint but its code is not available: {e}") from None
        return _LOADERS[kind]
    return None


def load_policy(path: str | Path) -> Policy:
    path = Path(path).expanduser()
    config_file = path / "config.json"
    if not path.exists():
        raise PolicyLoadError(f"checkpoint not found: {path}")
    if not config_file.is_file():
        raise PolicyLoadError(f"{path} is not a policy checkpoint (no config.json)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PolicyLoadError(f"cannot read {config_file}: {type(e).__name__}: {e}") from None
    if not isinstance(config, dict):
        raise PolicyLoadError(f"{config_file}: expected a JSON object with a policy_type")
    kind = config.get("policy_type")
    loader = _loader(kind, path) if isinstance(kind, str) else None
    if loader is None:
        known = ", ".join(repr(k) for k in registered_policy_types())
        hint = "" if _installed_policy_types() else \
            f"; no {ENTRY_POINT_GROUP} entry points are installed: install this package (./setup.sh)"
        raise PolicyLoadError(f"{config_file}: unknown policy_type {kind!r} (known: {known}){hint}")
    try:
        policy = loader(path, config)
    except PolicyLoadError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:  # a setting of the wrong kind
        raise PolicyLoadError(f"{config_file}: bad or missing setting ({type(e).__name__}: {e})") from None
    rate = getattr(policy, "control_rate", None)
    if not (_is_number(rate) and np.isfinite(rate) and rate > 0):
        raise PolicyLoadError(f"{config_file}: the policy's control_rate must be a number > 0, got {rate!r}")
    return policy


def checkpoint_identity(path: str | Path) -> str:
    """Which checkpoint runs, in one line: its path, its config's hash and its weights' size and time
    (hashing gigabytes of weights at start-up would delay the node)."""
    import hashlib

    path = Path(path).expanduser().resolve()
    parts = [str(path)]
    try:
        parts.append("config " + hashlib.sha256((path / "config.json").read_bytes()).hexdigest()[:12])
    except OSError:
        pass
    for weights in sorted(path.glob("*.safetensors"))[:1]:
        st = weights.stat()
        parts.append(f"{weights.name} {st.st_size / 2**20:.1f} MiB {time.strftime('%Y-%m-%d %H:%M', time.localtime(st.st_mtime))}")
    return ", ".join(parts)


def _load_constant(path: Path, config: dict[str, Any]) -> ConstantPolicy:
    options = {k: v for k, v in config.items() if k != "policy_type"}
    try:
        return ConstantPolicy(**options)
    except PolicyLoadError as e:
        raise PolicyLoadError(f"{path / 'config.json'}: {e}") from None
    except TypeError as e:  # an unknown or missing setting
        raise PolicyLoadError(f"{path / 'config.json'}: {e}") from None


register_policy_type("constant", _load_constant)
