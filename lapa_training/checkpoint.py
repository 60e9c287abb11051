"""Checkpoints for every model in lapa-ros (LAQ now, the VLA later): safetensors + JSON, no pickle.

A checkpoint is a directory:

    model.safetensors          the model's state_dict (parameters and buffers)
    config.json                the model config, as given
    trainer_state.safetensors  optional: optimizer tensors (moments, step counts) and RNG states
    trainer_state.json         optional: step, optimizer hyper-parameters and scalars, scheduler
                               state, the non-tensor parts of the RNG states
    checkpoint.json            written last: format version, step, extra, file sizes

Saves are atomic: everything is written to a temporary sibling directory, fsynced, then swapped
in with renames. A crash while writing leaves the old checkpoint untouched; a crash between the two
renames leaves it as ``.<name>.previous`` next to the target, which ``load_checkpoint`` falls back
to (with a warning). A directory without checkpoint.json is never treated as a checkpoint.

Resuming with ``load_trainer_state`` restores the optimizer, scheduler and the torch / numpy /
Python RNG states, so that a run resumed from a checkpoint reproduces the uninterrupted run's loss
curve exactly (given deterministic kernels and a data order that is a function of the RNG or step).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TRAINER_TENSORS_FILE = "trainer_state.safetensors"
TRAINER_JSON_FILE = "trainer_state.json"
META_FILE = "checkpoint.json"
FORMAT = "lapa-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(Exception):
    """A checkpoint is missing, damaged, or does not fit the model/optimizer/config it is loaded into."""


# ---------------------------------------------------------------------------------------------
# saving
# ---------------------------------------------------------------------------------------------
def save_checkpoint(directory: str | Path, model: torch.nn.Module, config: dict[str, Any], *,
                    optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None, step: int = 0,
                    extra: dict[str, Any] | None = None, write_files: Callable[[Path], None] | None = None,
                    state_dict: dict[str, torch.Tensor] | None = None,
                    optimizer_state: dict[str, Any] | None = None) -> Path:
    """Write model weights + config (+ optimizer/scheduler/RNG state when optimizer is given) to
    `directory`, atomically replacing an earlier checkpoint there. `write_files(dir)` may add files
    of the model's own (a tokenizer, action bins); they are part of the same atomic swap and their
    sizes are checked on load like the rest. `state_dict` and `optimizer_state` stand in for the
    model's and optimizer's own (a sharded run's, gathered whole). Returns the directory."""
    target = Path(directory)
    if target.exists() and not (target / META_FILE).is_file() and (not target.is_dir() or any(target.iterdir())):
        raise CheckpointError(f"refusing to overwrite {target}: it exists and is not a checkpoint "
                              f"(no {META_FILE})")
    if scheduler is not None and optimizer is None:
        raise ValueError("save_checkpoint: a scheduler was given without its optimizer")
    config_text = _dumps(config, "config")
    extra_obj = _jsonable(extra or {}, "extra")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        os.chmod(tmp, 0o755)
        save_file(_unshared(model.state_dict() if state_dict is None else state_dict), str(tmp / MODEL_FILE))
        (tmp / CONFIG_FILE).write_text(config_text)
        if optimizer is not None:
            tensors, state = _trainer_state(optimizer, scheduler, step, optimizer_state)
            save_file(tensors, str(tmp / TRAINER_TENSORS_FILE))
            (tmp / TRAINER_JSON_FILE).write_text(_dumps(state, "trainer state"))
        if write_files is not None:
            write_files(tmp)
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "step": int(step), "model_class": _class_name(model),
                "has_trainer_state": optimizer is not None, "files": files, "extra": extra_obj}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        for p in tmp.rglob("*"):
            _fsync(p)
        _fsync(tmp)
        _swap_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _class_name(model: torch.nn.Module) -> str:
    """The model's own class name (FSDP2 puts a class of its own, FSDP<name>, in front of it)."""
    return next(c.__name__ for c in type(model).__mro__ if not c.__module__.startswith("torch.distributed"))


def _backup_path(target: Path) -> Path:
    return target.parent / f".{target.name}.previous"


def _swap_into_place(tmp: Path, target: Path) -> None:
    backup = _backup_path(target)
    if backup.exists() and target.exists():  # a stale backup from an earlier, completed swap
        shutil.rmtree(backup)
    if target.exists():
        os.rename(target, backup)
    os.rename(tmp, target)  # until this succeeds, `backup` is the last good checkpoint
    _fsync(target.parent)
    shutil.rmtree(backup, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors; tensors that share storage (tied weights) get their own copy, which
    safetensors requires."""
    out, seen = {}, set()
    for k, v in state.items():
        v = v.detach().cpu()
        key = (v.untyped_storage().data_ptr(), v.dtype) if v.numel() else None
        if key in seen:
            v = v.clone()
        elif key is not None:
            seen.add(key)
        out[k] = v.contiguous()
    return out


def _trainer_state(optimizer, scheduler, step: int, sd: dict[str, Any] | None = None
                   ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    sd = optimizer.state_dict() if sd is None else sd
    state_scalars: dict[str, dict[str, Any]] = {}
    state_tensors: dict[str, list[str]] = {}
    for pid, entries in sd["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"optimizer/{pid}/{name}"] = value.detach().cpu().contiguous()
                state_tensors.setdefault(str(pid), []).append(name)
            else:
                state_scalars.setdefault(str(pid), {})[name] = _jsonable(value, f"optimizer state {pid}.{name}")
    tensors["rng/torch"] = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    for i, s in enumerate(cuda_states):
        tensors[f"rng/cuda/{i}"] = s
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors["rng/numpy"] = torch.from_numpy(np_keys.astype(np.int64))
    py_version, py_internal, py_gauss = random.getstate()
    tensors["rng/python"] = torch.tensor(py_internal, dtype=torch.int64)
    state = {
        "step": int(step),
        "optimizer": {"class": type(optimizer).__name__, "param_groups": _jsonable(sd["param_groups"], "param_groups"),
                      "state_tensors": state_tensors, "state_scalars": state_scalars},
        "scheduler": None if scheduler is None else {"class": type(scheduler).__name__,
                                                     "state": _jsonable(scheduler.state_dict(), "scheduler state")},
        "rng": {"cuda_devices": len(cuda_states),
                "numpy": {"name": np_name, "pos": int(np_pos), "has_gauss": int(np_has_gauss),
                          "cached_gaussian": float(np_gauss)},
                "python": {"version": py_version, "gauss_next": py_gauss}},
    }
    return tensors, state


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------
def resolve_checkpoint(directory: str | Path) -> Path:
    """The directory to read: `directory` itself, or its `.previous` backup when a save crashed
    between its two renames. Raises CheckpointError when neither is a complete checkpoint."""
    target = Path(directory)
    if (target / META_FILE).is_file():
        return target
    backup = _backup_path(target)
    if not target.exists() and (backup / META_FILE).is_file():
        warnings.warn(f"{target} is missing but {backup} is complete (a save was interrupted); loading that")
        return backup
    if not target.exists():
        raise CheckpointError(f"no checkpoint at {target}")
    raise CheckpointError(f"{target} is not a complete checkpoint: {META_FILE} is missing "
                          f"(not a checkpoint directory, or its save never finished)")


def read_meta(directory: str | Path) -> dict[str, Any]:
    """checkpoint.json of a checkpoint: format, version, step, model_class, has_trainer_state, files, extra."""
    path = resolve_checkpoint(directory)
    meta = _read_json(path / META_FILE)
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {meta.get('format')!r} version {meta.get('version')!r}; "
                              f"this code reads {FORMAT!r} version {FORMAT_VERSION}")
    for name, size in meta.get("files", {}).items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is damaged: {name} is missing")
        if file.stat().st_size != size:
            raise CheckpointError(f"checkpoint {path} is damaged: {name} has {file.stat().st_size} bytes, "
                                  f"{size} were written")
    meta["path"] = str(path)
    return meta


def load_checkpoint(directory: str | Path, *, device: str | torch.device = "cpu"
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """-> (model state_dict, config dict, extra dict)."""
    meta = read_meta(directory)
    path = Path(meta["path"])
    for name in (MODEL_FILE, CONFIG_FILE):
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path} has no {name}")
    try:
        state = load_file(str(path / MODEL_FILE), device=str(device))
    except Exception as e:  # safetensors raises its own error types for truncated/garbled files
        raise CheckpointError(f"cannot read {path / MODEL_FILE}: {e}") from e
    return state, _read_json(path / CONFIG_FILE), meta.get("extra", {})


def load_trainer_state(directory: str | Path, optimizer: torch.optim.Optimizer, scheduler: Any = None, *,
                       restore_rng: bool = True) -> int:
    """Restore optimizer (+ scheduler, + RNG states) saved with the checkpoint; return its step.

    Load the model weights first (the optimizer state refers to the model's parameters by position)."""
    meta = read_meta(directory)
    path = Path(meta["path"])
    if not meta.get("has_trainer_state"):
        raise CheckpointError(f"checkpoint {path} has no trainer state (it was saved without an optimizer)")
    state = _read_json(path / TRAINER_JSON_FILE)
    try:
        tensors = load_file(str(path / TRAINER_TENSORS_FILE))
    except Exception as e:
        raise CheckpointError(f"cannot read {path / TRAINER_TENSORS_FILE}: {e}") from e

    opt = state["optimizer"]
    if opt["class"] != type(optimizer).__name__:
        raise CheckpointError(f"checkpoint {path} holds {opt['class']} state but the optimizer is "
                              f"{type(optimizer).__name__}")
    per_param: dict[int, dict[str, Any]] = {}
    for pid, names in opt["state_tensors"].items():
        for name in names:
            per_param.setdefault(int(pid), {})[name] = tensors[f"optimizer/{pid}/{name}"]
    for pid, scalars in opt["state_scalars"].items():
        per_param.setdefault(int(pid), {}).update(_from_jsonable(scalars))
    saved_groups = _from_jsonable(opt["param_groups"])
    current_sizes = [len(g["params"]) for g in optimizer.param_groups]
    saved_sizes = [len(g["params"]) for g in saved_groups]
    if current_sizes != saved_sizes:
        raise CheckpointError(f"checkpoint {path} has optimizer parameter groups of sizes {saved_sizes} but the "
                              f"optimizer has {current_sizes}: the model or its trainable parameters changed")
    try:
        optimizer.load_state_dict({"state": per_param, "param_groups": saved_groups})
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"cannot load the optimizer state of {path}: {e}") from e

    if scheduler is not None:
        if state["scheduler"] is None:
            raise CheckpointError(f"checkpoint {path} was saved without a scheduler")
        if state["scheduler"]["class"] != type(scheduler).__name__:
            raise CheckpointError(f"checkpoint {path} holds {state['scheduler']['class']} state but the scheduler "
                                  f"is {type(scheduler).__name__}")
        scheduler.load_state_dict(_from_jsonable(state["scheduler"]["state"]))

    if restore_rng:
        rng = state["rng"]
        torch.set_rng_state(tensors["rng/torch"])
        if rng["cuda_devices"] and torch.cuda.is_available():
            cuda_states = [tensors[f"rng/cuda/{i}"] for i in range(rng["cuda_devices"])]
            torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
        n = rng["numpy"]
        np.random.set_state((n["name"], tensors["rng/numpy"].numpy().astype(np.uint32), n["pos"],
                             n["has_gauss"], n["cached_gaussian"]))
        p = rng["python"]
        random.setstate((p["version"], tuple(int(v) for v in tensors["rng/python"].tolist()), p["gauss_next"]))
    return int(state["step"])


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor], *, source: Any = "checkpoint") -> None:
    """model.load_state_dict(state, strict) with an error that names missing, unexpected and
    wrong-shaped keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {abbreviate(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {abbreviate(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches {abbreviate(shapes)}")
        raise CheckpointError(f"weights in {source} do not fit {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


# ---------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------
def config_mismatches(saved: dict[str, Any], wanted: dict[str, Any], *, ignore=()) -> list[tuple[str, Any, Any]]:
    """(key, saved value, wanted value) for every key whose value differs (or is absent on one
    side, shown as '<missing>'), keys in `ignore` left out. Lists and tuples compare equal."""
    missing = "<missing>"
    out = []
    for key in sorted(set(saved) | set(wanted)):
        if key in ignore:
            continue
        a, b = _norm(saved.get(key, missing)), _norm(wanted.get(key, missing))
        if a != b:
            out.append((key, saved.get(key, missing), wanted.get(key, missing)))
    return out


def check_config_compatible(saved: dict[str, Any], wanted: dict[str, Any], *, source: Any = "checkpoint",
                            ignore=()) -> None:
    """Raise CheckpointError naming every mismatching key, e.g. "checkpoint X has codebook_size 16
    but the config asks for 8"."""
    diffs = config_mismatches(saved, wanted, ignore=ignore)
    if diffs:
        described = "; ".join(f"{k} {_show(a)} but the config asks for {_show(b)}" for k, a, b in diffs)
        raise CheckpointError(f"checkpoint {source} has {described}")


def _norm(v):
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    if isinstance(v, dict):
        return {k: _norm(x) for k, x in v.items()}
    return v


def _show(v) -> str:
    return json.dumps(_norm(v)) if not isinstance(v, str) or v == "<missing>" else repr(v)


def abbreviate(items: list[str], n: int = 8) -> str:
    """The first n items, joined, and how many more there are (for errors that list keys)."""
    return ", ".join(items[:n]) + (f" ... ({len(items) - n} more)" if len(items) > n else "")


# ---------------------------------------------------------------------------------------------
# JSON without pickle: tuples and 0-d tensors are tagged so they come back as they went in
# ---------------------------------------------------------------------------------------------
def _jsonable(obj: Any, where: str) -> Any:
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [_jsonable(v, where) for v in obj]}
    if isinstance(obj, list):
        return [_jsonable(v, where) for v in obj]
    if isinstance(obj, dict):
        bad = [k for k in obj if not isinstance(k, str)]
        if bad:
            raise CheckpointError(f"cannot store {where}: non-string dict keys {bad[:5]}")
        return {k: _jsonable(v, f"{where}.{k}") for k, v in obj.items()}
    if torch.is_tensor(obj) and obj.numel() == 1 and obj.ndim == 0:
        return {"__tensor__": obj.item(), "dtype": str(obj.dtype).removeprefix("torch.")}
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    raise CheckpointError(f"cannot store {where}: {type(obj).__name__} is not JSON-serialisable "
                          f"(checkpoints never pickle)")


def _from_jsonable(obj: Any) -> Any:
    if isinstance(obj, list):
        return [_from_jsonable(v) for v in obj]
    if isinstance(obj, dict):
        if set(obj) == {"__tuple__"}:
            return tuple(_from_jsonable(v) for v in obj["__tuple__"])
        if set(obj) == {"__tensor__", "dtype"}:
            return torch.tensor(obj["__tensor__"], dtype=getattr(torch, obj["dtype"]))
        return {k: _from_jsonable(v) for k, v in obj.items()}
    return obj


def _dumps(obj: Any, where: str) -> str:
    try:
        return json.dumps(obj, indent=2)
    except TypeError as e:
        raise CheckpointError(f"cannot store {where} as JSON: {e}") from e


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the checkpoint is damaged") from e
