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
        self._stamps: dict[str, list[int]] = defaultdict(list)
        self._positions: dict[str, list[float]] = defaultdict(list)
        self.messages = 0
        self.without_positions = 0  # messages with names but no (or too few) positions

    def add(self, stamp_ns: int, names, positions) -> None:
        self.messages += 1
        names = list(names)
        if len(positions) != len(names):
            self.without_positions += 1  # JointState allows empty position arrays (effort-only publishers)
            return
        for name, value in zip(names, positions):
            self._stamps[name].append(int(stamp_ns))
            self._positions[name].append(float(value))

    @property
    def names(self) -> list[str]:
        return sorted(self._stamps)

    def positions_at(self, names, t_ns: np.ndarray, max_outside_ns: int) -> dict[str, np.ndarray]:
        """Each joint's position (N,) at times t_ns; NaN more than max_outside_ns before its first or after its last sample.

        Raises KeyError naming the first joint that never has a position.
        """
        t_ns = np.asarray(t_ns, dtype=np.int64)
        out = {}
        for name in names:
            if name not in self._stamps:
                raise KeyError(name)
            stamps = np.asarray(self._stamps[name], dtype=np.int64)
            values = np.asarray(self._positions[name], dtype=np.float64)
            order = np.argsort(stamps, kind="stable")
            stamps, values = stamps[order], values[order]
            q = np.interp((t_ns - stamps[0]).astype(np.float64), (stamps - stamps[0]).astype(np.float64), values)
            q[(t_ns < stamps[0] - max_outside_ns) | (t_ns > stamps[-1] + max_outside_ns)] = np.nan
            out[name] = q
        return out
