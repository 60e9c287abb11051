"""The TF tree of a whole bag (/tf and /tf_static), and base_T_tip at any times through a chain of any depth.

Like tf2's buffer, each edge parent -> child is interpolated on its own (position linearly, rotation by
slerp) and the edges along the path are composed; static edges hold for all time. Unlike tf2, the
whole bag is known up front, so lookups are vectorised over all grid times at once. A time before
an edge's first or after its last transform counts when within max_outside_ns, else gives NaN, and
so does a time inside a gap between two transforms longer than max_gap_ns (dropped messages).

    tree = TransformHistory()
    tree.add("panda_link0", "panda_link1", stamp_ns, (x, y, z), (qw, qx, qy, qz), static=False)
    base_T_tcp = tree.lookup("panda_link0", "panda_hand_tcp", grid_ns, max_outside_ns)  # (N, 4, 4)
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from lapa_training.data import actions as act


class TransformError(ValueError):
    """The frames asked for are not (all) in the tree, or not connected; the message says which."""


class TransformHistory:
    def __init__(self):
        self._stamps: dict[tuple[str, str], list[int]] = defaultdict(list)
        self._values: dict[tuple[str, str], list[tuple[float, ...]]] = defaultdict(list)  # x y z qx qy qz qw
        self._static: dict[tuple[str, str], tuple[float, ...]] = {}
        self._parents: dict[str, set[str]] = defaultdict(set)
        self._edges: set[tuple[str, str]] = set()

    def add(self, parent: str, child: str, stamp_ns: int, translation, quat_wxyz, static: bool) -> None:
        w, x, y, z = map(float, quat_wxyz)
        self.add_transforms([(int(stamp_ns), parent, child, (*map(float, translation), x, y, z, w))], static)

    def add_transforms(self, transforms, static: bool) -> None:
        """transforms: [(stamp [ns], parent, child, (x, y, z, qx, qy, qz, qw)), ...] as cdr.tf_message gives them."""
        for stamp, parent, child, value in transforms:
            if parent[:1] == "/" or child[:1] == "/":  # tf2 ignores a leading slash too
                parent, child = parent.lstrip("/"), child.lstrip("/")
            key = (parent, child)
            if key not in self._edges:
                self._edges.add(key)
                self._parents[child].add(parent)
            if static:
                self._static[key] = value
            else:
                self._stamps[key].append(stamp)
                self._values[key].append(value)

    @property
    def frames(self) -> set[str]:
        return set(self._parents) | {p for ps in self._parents.values() for p in ps}

    def __len__(self) -> int:
        return len(self._static) + sum(len(v) for v in self._stamps.values())

    def _path_to_root(self, frame: str) -> list[str]:
        path = [frame]
        while path[-1] in self._parents:
            parents = self._parents[path[-1]]
            if len(parents) > 1:
                raise TransformError(f"frame '{path[-1]}' has several parents on /tf ({', '.join(sorted(parents))})")
            parent = next(iter(parents))
            if parent in path:
                raise TransformError(f"the TF tree has a loop through '{parent}'")
            path.append(parent)
        return path

    def chain(self, base: str, tip: str) -> tuple[list[str], list[str]]:
        """The frames from base up to the common ancestor, and from tip up to it (both ending before it)."""
        base, tip = base.lstrip("/"), tip.lstrip("/")
        known = self.frames
        for role, frame in (("base", base), ("TCP", tip)):
            if frame not in known:
                raise TransformError(f"the {role} frame '{frame}' never appears on /tf or /tf_static "
                                     f"(frames: {', '.join(sorted(known)) or 'none'})")
        up, down = self._path_to_root(base), self._path_to_root(tip)
        if up[-1] != down[-1]:
            raise TransformError(f"frames '{base}' and '{tip}' are not connected on /tf and /tf_static "
                                 f"(their trees start at '{up[-1]}' and '{down[-1]}')")
        common = next(frame for frame in up if frame in down)
        return up[:up.index(common)], down[:down.index(common)]

    def _edge(self, child: str, t_ns: np.ndarray, max_outside_ns: int, max_gap_ns: int | None) -> np.ndarray:
        """parent_T_child (N, 4, 4) of the edge into child, at times t_ns."""
        parent = next(iter(self._parents[child]))
        key = (parent, child)
        out = np.tile(np.eye(4), (len(t_ns), 1, 1))
        if key in self._stamps:
            values = np.array(self._values[key])
            pos, quat = act.interpolate_poses(t_ns, np.array(self._stamps[key], dtype=np.int64), values[:, :3],
                                              values[:, [6, 3, 4, 5]], max_outside_ns, max_gap_ns)
        else:
            value = np.array(self._static[key])
            pos, quat = np.tile(value[:3], (len(t_ns), 1)), np.tile(value[[6, 3, 4, 5]], (len(t_ns), 1))
        valid = np.isfinite(quat).all(axis=1)
        out[:, :3, :3] = act.quat_to_matrix(np.where(valid[:, None], quat, [1.0, 0.0, 0.0, 0.0]))
        out[:, :3, 3] = pos
        out[~valid] = np.nan
        return out

    def lookup(self, base: str, tip: str, t_ns: np.ndarray, max_outside_ns: int,
               max_gap_ns: int | None = None) -> np.ndarray:
        """base_T_tip (N, 4, 4) at times t_ns; NaN where an edge of the chain has no transform near enough
        (past its ends by more than max_outside_ns, or inside a gap longer than max_gap_ns)."""
        t_ns = np.asarray(t_ns, dtype=np.int64)
        up, down = self.chain(base, tip)

        def from_ancestor(path: list[str]) -> np.ndarray:
            out = np.tile(np.eye(4), (len(t_ns), 1, 1))
            for child in reversed(path):  # the ancestor's child first
                out = out @ self._edge(child, t_ns, max_outside_ns, max_gap_ns)
            return out

        return act.invert_transforms(from_ancestor(up)) @ from_ancestor(down)
