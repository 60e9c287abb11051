"""Reading a dataclass (a model config, a settings section) back from a plain dict, with an error
that names the unknown keys and lists the known ones."""

from __future__ import annotations

from dataclasses import fields
from typing import Any


def dataclass_kwargs(cls, d: dict[str, Any], what: str, *, model_type: str | None = None,
                     error: type[Exception] = ValueError) -> dict[str, Any]:
    """The keyword arguments of `cls` in `d`. With `model_type`, d may carry a 'model_type' key,
    which must equal it (and is dropped)."""
    d = dict(d)
    if model_type is not None:
        found = d.pop("model_type", model_type)
        if found != model_type:
            raise error(f"config has model_type {found!r}, expected {model_type!r}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise error(f"unknown {what} {unknown}; known: {sorted(known)}")
    return d
