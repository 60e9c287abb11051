"""Joint positions of a whole bag, per joint: /joint_states split across publishers or carrying a subset.

Each sensor_msgs/JointState message adds a sample to every joint it names, so an arm driver and a
gripper driver publishing on the same topic, or messages with only some joints, merge into one
timeline per joint. Positions at other times are interpolated linearly.

    history = JointStateHistory()
    history.add(stamp_ns, ["panda_joint1", ...], [0.1, ...])
    q = history.positions_at(["panda_joint1"], grid_ns, max_outside_ns)  # {"panda_joint1": (N,)}
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np


class JointStateHistory:
    def __init__(self):
        self._messages: dict[tuple[str, ...], tuple[list[int], list[np.ndarray]]] = {}  # names -> stamps, positions
        self._series: dict[str, tuple[np.ndarray, np.ndarray]] | None = None
        self.messages = 0
        self.without_positions = 0  # messages with names but no (or too few) positions

    def add(self, stamp_ns: int, names, positions) -> None:
        self.messages += 1
        names = tuple(names)
        if len(positions) != len(names):
            self.without_positions += 1  # JointState allows empty position arrays (effort-only publishers)
            return
        stamps, values = self._messages.setdefault(names, ([], []))
        stamps.append(int(stamp_ns))
        values.append(np.asarray(positions, dtype=np.float64))
        self._series = None

    def _by_joint(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """joint -> (stamps sorted, positions), merged over every publisher's name list."""
        if self._series is None:
            parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
            for names, (stamps, values) in self._messages.items():
                stamps_arr, values_arr = np.asarray(stamps, dtype=np.int64), np.stack(values)
                for i, name in enumerate(names):
                    parts.setdefault(name, []).append((stamps_arr, values_arr[:, i]))
            self._series = {}
            for name, chunks in parts.items():
                stamps = np.concatenate([c[0] for c in chunks])
                values = np.concatenate([c[1] for c in chunks])
                order = np.argsort(stamps, kind="stable")
                self._series[name] = (stamps[order], values[order])
        return self._series

    @property
    def names(self) -> list[str]:
        return sorted(self._by_joint())

    def positions_at(self, names, t_ns: np.ndarray, max_outside_ns: int,
                     max_gap_ns: int | None = None) -> dict[str, np.ndarray]:
        """Each joint's position (N,) at times t_ns; NaN more than max_outside_ns before its first or after its
        last sample, and inside a gap between samples longer than max_gap_ns (when given).

        Raises KeyError naming the first joint that never has a position.
        """
        t_ns = np.asarray(t_ns, dtype=np.int64)
        series = self._by_joint()
        out = {}
        for name in names:
            if name not in series:
                raise KeyError(name)
            stamps, values = series[name]
            q = np.interp((t_ns - stamps[0]).astype(np.float64), (stamps - stamps[0]).astype(np.float64), values)
            q[(t_ns < stamps[0] - max_outside_ns) | (t_ns > stamps[-1] + max_outside_ns)] = np.nan
            if max_gap_ns is not None and len(stamps) > 1:
                hi = np.clip(np.searchsorted(stamps, t_ns, side="right"), 1, len(stamps) - 1)
                inside = (t_ns > stamps[hi - 1]) & (t_ns < stamps[hi])
                q[inside & (stamps[hi] - stamps[hi - 1] > max_gap_ns)] = np.nan
            out[name] = q
        return out
