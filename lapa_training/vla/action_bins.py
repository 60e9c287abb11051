"""Discrete action bins for the VLA's action head: equal-frequency (quantile) bins per action dimension.

The 7-D action (bag_format.ACTION_NAMES: dx dy dz [m], droll dpitch dyaw [rad] per control step,
gripper closure 0 open .. 1 closed) is turned into 7 integers, one per dimension, the classes the
action head predicts. As in the LAPA code, the six motion dimensions get equal-frequency bins fitted
on the finetuning data and the gripper is binary (closure >= threshold -> bin 1 = closed); a gripper
with more than 2 bins is binned by quantiles like the rest.

Bin i of a dimension with sorted boundaries e_0 < e_1 < ... < e_{n-2} covers [e_{i-1}, e_i) (the
first bin reaches down to -inf, the last up to +inf), so ``encode`` is a ``searchsorted``.

Peaky data. Robot actions are full of exact repeats (zero motion while the gripper closes, the
same commanded speed step after step). Quantile boundaries then coincide and would leave empty
bins. Fitting handles that deliberately:

1. a value that two or more quantile boundaries land on (a point mass holding more than one bin's
   share of the data) gets a bin of its own, [z, nextafter(z)), which contains exactly z;
2. boundaries that still leave a bin without training samples are removed (the empty bin merges
   into its lower neighbour).

So every bin holds training samples, a dimension may end up with fewer bins than asked for, and
``num_bins`` reports the effective count per dimension (``summary()`` says which were merged).
A bin decodes to the median (default) or mean of the training values that fell into it, or to the
centre of its span ("center": minimax error, but sensitive to outliers in the two outer bins).

Missing actions (NaN, e.g. the last frame of an episode) are left out of fitting; ``encode`` maps a
NaN to IGNORE_INDEX (-100, what torch's cross-entropy skips) and ``decode`` maps that back to NaN.

Stored as plain JSON (``save``/``load``, ``to_dict``/``from_dict``); floats round-trip exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

# The dataset's action layout (lapa_training.data.bag_format.ACTION_NAMES), repeated here so the
# policy side needs no import from the data package.
ACTION_NAMES = ("dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper")
ACTION_DIM = len(ACTION_NAMES)
GRIPPER_DIM = ACTION_NAMES.index("gripper")
IGNORE_INDEX = -100
VALUE_MODES = ("median", "mean", "center")
FORMAT = "lapa-action-bins"
FORMAT_VERSION = 1


@dataclass
class DimBins:
    """The bins of one action dimension."""

    name: str
    kind: str  # "quantile" or "binary"
    requested: int  # bins asked for
    edges: np.ndarray  # (n - 1,) float64 sorted boundaries
    values: np.ndarray  # (n,) float64 decode value of each bin
    counts: np.ndarray  # (n,) int64 training samples per bin
    low: float  # training data range
    high: float

    @property
    def num_bins(self) -> int:
        return len(self.values)

    def widths(self) -> np.ndarray:
        """(n,) width of each bin, the outer two bounded by the training data range."""
        bounds = np.concatenate([[self.low], self.edges, [self.high]])
        return np.maximum(np.diff(bounds), 0.0)


class ActionBins:
    """Per-dimension discretisation of (..., 7) actions; build with ``ActionBins.fit``."""

    def __init__(self, dims: Sequence[DimBins], value_mode: str = "median", num_samples: int = 0):
        self.dims = list(dims)
        self.value_mode = value_mode
        self.num_samples = int(num_samples)
        self._edges = [np.asarray(d.edges, dtype=np.float64) for d in self.dims]
        self._values = [np.asarray(d.values, dtype=np.float64) for d in self.dims]

    # ---- fitting -------------------------------------------------------------------------
    @classmethod
    def fit(cls, actions: np.ndarray, num_bins: int = 256, *, gripper_bins: int = 2,
            gripper_threshold: float = 0.5, value: str = "median",
            names: Sequence[str] = ACTION_NAMES) -> "ActionBins":
        """Fit bins on training actions (N, D); rows with any NaN are ignored.

        num_bins: bins per motion dimension (>= 2). gripper_bins: 2 = binary at gripper_threshold
        (closure >= threshold is bin 1, decoded as 1.0; below is bin 0, decoded as 0.0); more than
        2 = quantile bins like the motion dimensions. value: what a bin decodes to, one of
        'median', 'mean', 'center'."""
        names = tuple(names)
        _check_bin_count("num_bins", num_bins)
        _check_bin_count("gripper_bins", gripper_bins)
        if value not in VALUE_MODES:
            raise ValueError(f"ActionBins.fit: value must be one of {', '.join(VALUE_MODES)}, got {value!r}")
        a = np.asarray(actions, dtype=np.float64)
        if a.ndim != 2 or a.shape[1] != len(names):
            raise ValueError(f"ActionBins.fit expects actions of shape (N, {len(names)}) ({', '.join(names)}), "
                             f"got {a.shape}")
        finite_rows = np.isfinite(a).all(axis=1)
        if np.isinf(a).any():
            raise ValueError("ActionBins.fit: actions contain +-inf; only NaN (missing) is allowed")
        a = a[finite_rows]
        if len(a) == 0:
            raise ValueError("ActionBins.fit: no action rows without NaN to fit bins on "
                             "(is this an action-free dataset or split?)")
        dims = []
        for d, name in enumerate(names):
            x = a[:, d]
            if name == "gripper" and gripper_bins == 2:
                dims.append(_fit_binary(name, x, float(gripper_threshold)))
            else:
                dims.append(_fit_quantile(name, x, gripper_bins if name == "gripper" else num_bins, value))
        return cls(dims, value_mode=value, num_samples=len(a))

    # ---- sizes ---------------------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.dims)

    @property
    def num_dims(self) -> int:
        return len(self.dims)

    @property
    def num_bins(self) -> tuple[int, ...]:
        """Effective bin count per dimension (<= requested when duplicate edges were merged)."""
        return tuple(d.num_bins for d in self.dims)

    @property
    def requested_bins(self) -> tuple[int, ...]:
        return tuple(d.requested for d in self.dims)

    @property
    def max_bins(self) -> int:
        return max(self.num_bins)

    def valid_mask(self, width: int | None = None) -> np.ndarray:
        """(D, width) bool: which of `width` head outputs per dimension are real bins."""
        width = width or self.max_bins
        if width < self.max_bins:
            raise ValueError(f"a head with {width} outputs per dimension cannot hold these bins "
                             f"(up to {self.max_bins}: {dict(zip(self.names, self.num_bins))})")
        return np.arange(width)[None, :] < np.asarray(self.num_bins)[:, None]

    # ---- encode / decode -----------------------------------------------------------------
    def encode(self, actions: np.ndarray) -> np.ndarray:
        """(..., D) float actions -> (..., D) int64 bin ids; NaN -> IGNORE_INDEX (-100).
        Values outside the training range land in the outermost bins."""
        a = np.asarray(actions, dtype=np.float64)
        self._check_last_dim(a, "encode")
        out = np.empty(a.shape, dtype=np.int64)
        for d, edges in enumerate(self._edges):
            col = a[..., d]
            out[..., d] = np.searchsorted(edges, col, side="right")
            out[..., d][np.isnan(col)] = IGNORE_INDEX
        return out

    def decode(self, ids: np.ndarray) -> np.ndarray:
        """(..., D) int bin ids -> (..., D) float32 actions (each bin's value); IGNORE_INDEX -> NaN."""
        ids = np.asarray(ids)
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"ActionBins.decode expects integer bin ids, got dtype {ids.dtype}")
        self._check_last_dim(ids, "decode")
        out = np.empty(ids.shape, dtype=np.float32)
        for d, values in enumerate(self._values):
            col = ids[..., d]
            ignored = col == IGNORE_INDEX
            bad = ~ignored & ((col < 0) | (col >= len(values)))
            if bad.any():
                raise ValueError(f"ActionBins.decode: bin ids of {self.names[d]} must be in [0, {len(values)}), "
                                 f"got {int(col[bad].flat[0])}")
            out[..., d] = values[np.where(ignored, 0, col)]
            out[..., d][ignored] = np.nan
        return out

    def value_table(self, width: int | None = None) -> np.ndarray:
        """(D, width) float64: each bin's decode value, 0 past a dimension's bin count. With a
        head's softmax p (..., D, width), (p * table).sum(-1) is the expected action."""
        width = width or self.max_bins
        self.valid_mask(width)  # raises when a dimension has more bins than `width`
        table = np.zeros((self.num_dims, width))
        for d, values in enumerate(self._values):
            table[d, :len(values)] = values
        return table

    def spreads(self) -> np.ndarray:
        """(D,) standard deviation of the training actions per dimension, from the bins' values and
        counts (> 0: a dimension without spread gets 1)."""
        std = self._moments()[1]
        return np.where(std > 0, std, 1.0)

    def means(self) -> np.ndarray:
        """(D,) mean of the training actions per dimension, from the bins' values and counts."""
        return self._moments()[0]

    def _moments(self) -> tuple[np.ndarray, np.ndarray]:
        mean, std = np.zeros(self.num_dims), np.zeros(self.num_dims)
        for d, dim in enumerate(self.dims):
            w = dim.counts / max(dim.counts.sum(), 1)
            mean[d] = float((w * dim.values).sum())
            std[d] = float(np.sqrt((w * (dim.values - mean[d]) ** 2).sum()))
        return mean, std

    @property
    def continuous_dims(self) -> np.ndarray:
        """(D,) bool: the quantile-binned (motion) dimensions; binary ones (the gripper) are False."""
        return np.array([d.kind == "quantile" for d in self.dims])

    def bin_widths(self, ids: np.ndarray) -> np.ndarray:
        """(..., D) widths of the given bins (outer bins bounded by the training range)."""
        ids = np.asarray(ids)
        self._check_last_dim(ids, "bin_widths")
        out = np.empty(ids.shape, dtype=np.float64)
        for d, dim in enumerate(self.dims):
            out[..., d] = dim.widths()[ids[..., d]]
        return out

    def _check_last_dim(self, a: np.ndarray, what: str) -> None:
        if a.ndim == 0 or a.shape[-1] != self.num_dims:
            raise ValueError(f"ActionBins.{what} expects (..., {self.num_dims}) arrays "
                             f"({', '.join(self.names)}), got shape {a.shape}")

    # ---- reporting -----------------------------------------------------------------------
    def summary(self) -> str:
        """One line per dimension: kind, effective / requested bins, range."""
        lines = [f"action bins fitted on {self.num_samples} actions, decode value: {self.value_mode}"]
        for d in self.dims:
            merged = f" ({d.requested - d.num_bins} merged: repeated values)" if d.num_bins < d.requested else ""
            lines.append(f"  {d.name:8s} {d.kind:8s} {d.num_bins:4d}/{d.requested} bins{merged}, "
                         f"range [{d.low:.4g}, {d.high:.4g}]")
        return "\n".join(lines)

    # ---- persistence ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": FORMAT_VERSION, "value_mode": self.value_mode,
                "num_samples": self.num_samples,
                "dims": [{"name": d.name, "kind": d.kind, "requested": int(d.requested),
                          "edges": [float(v) for v in d.edges], "values": [float(v) for v in d.values],
                          "counts": [int(v) for v in d.counts], "low": float(d.low), "high": float(d.high)}
                         for d in self.dims]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ActionBins":
        if data.get("format") != FORMAT or data.get("version") != FORMAT_VERSION:
            raise ValueError(f"not action bins of format {FORMAT!r} version {FORMAT_VERSION} "
                             f"(got {data.get('format')!r} version {data.get('version')!r})")
        dims = []
        for d in data["dims"]:
            edges, values = np.asarray(d["edges"], np.float64), np.asarray(d["values"], np.float64)
            if len(values) != len(edges) + 1 or len(d["counts"]) != len(values) or np.any(np.diff(edges) <= 0):
                raise ValueError(f"action bins of {d.get('name')!r} are inconsistent: {len(edges)} edges, "
                                 f"{len(values)} values, {len(d['counts'])} counts, edges increasing: "
                                 f"{bool(np.all(np.diff(edges) > 0))}")
            dims.append(DimBins(d["name"], d["kind"], int(d["requested"]), edges, values,
                                np.asarray(d["counts"], np.int64), float(d["low"]), float(d["high"])))
        return cls(dims, value_mode=data.get("value_mode", "median"), num_samples=data.get("num_samples", 0))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict()) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ActionBins":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read action bins {path}: {e}") from None
        try:
            return cls.from_dict(data)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None

    def __eq__(self, other) -> bool:
        return isinstance(other, ActionBins) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"ActionBins({dict(zip(self.names, self.num_bins))}, value={self.value_mode!r})"


# ---------------------------------------------------------------------------------------------
# fitting one dimension
# ---------------------------------------------------------------------------------------------
def _check_bin_count(name: str, n) -> None:
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 2:
        raise ValueError(f"{name} must be an integer >= 2 (one bin cannot tell actions apart), got {n!r}")


def _fit_binary(name: str, x: np.ndarray, threshold: float) -> DimBins:
    if not np.isfinite(threshold):
        raise ValueError(f"gripper_threshold must be finite, got {threshold}")
    edges = np.array([threshold])
    counts = np.bincount(np.searchsorted(edges, x, side="right"), minlength=2).astype(np.int64)
    return DimBins(name, "binary", 2, edges, np.array([0.0, 1.0]), counts, float(x.min()), float(x.max()))


def _fit_quantile(name: str, x: np.ndarray, n: int, value: str) -> DimBins:
    x = np.sort(x)
    # boundaries are data values (inverted CDF), so repeated values show up as repeated boundaries
    q = np.quantile(x, np.arange(1, n) / n, method="inverted_cdf")
    uniq, reps = np.unique(q, return_counts=True)
    edges = []
    for z, r in zip(uniq, reps):
        edges.append(z)
        if r > 1:  # a point mass worth more than one bin: a bin [z, nextafter(z)) holding exactly z
            edges.append(np.nextafter(z, np.inf))
    edges = np.unique(np.asarray(edges, dtype=np.float64))
    # drop boundaries that leave a bin without training samples: new boundaries are the lower
    # boundaries of the occupied bins (but the first), so every new bin starts with an occupied one
    ids = np.searchsorted(edges, x, side="right")
    occupied = np.flatnonzero(np.bincount(ids, minlength=len(edges) + 1))
    edges = edges[occupied[1:] - 1]
    ids = np.searchsorted(edges, x, side="right")
    counts = np.bincount(ids, minlength=len(edges) + 1).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    values = np.empty(len(counts))
    for i, (s, c) in enumerate(zip(starts, counts)):
        chunk = x[s:s + c]  # x is sorted, so bin i is a contiguous run
        if value == "median":
            values[i] = np.median(chunk)
        elif value == "mean":
            values[i] = np.clip(chunk.mean(), chunk[0], chunk[-1])
        else:
            lo = x[0] if i == 0 else edges[i - 1]
            hi = x[-1] if i == len(counts) - 1 else edges[i]
            values[i] = 0.5 * (lo + hi)
    return DimBins(name, "quantile", n, edges, values, counts, float(x[0]), float(x[-1]))
