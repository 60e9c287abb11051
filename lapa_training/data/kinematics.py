"""A robot's kinematics from its URDF: the joints between two links, their limits, batched forward kinematics.

URDF parsing and forward kinematics come from pytorch_kinematics (maintained, batched, runs on the
torch the project already ships; see docs/DECISIONS.md). This module asks it what ingest needs and
turns its failures into one-line IngestErrors.

    robot = RobotModel.from_urdf(Path("urdf/lapa_panda.urdf"))
    robot.chain_joints("panda_link0", "panda_hand_tcp")        # ['panda_joint1', ..., 'panda_joint7']
    base_T_tcp = robot.transforms("panda_link0", "panda_hand_tcp", {"panda_joint1": q1, ...})  # (N, 4, 4)
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Mapping

import numpy as np

from lapa_training.data import actions as act
from lapa_training.data.errors import IngestError


class RobotModel:
    """One URDF: its link tree, movable joints with limits, and forward kinematics between any two links."""

    def __init__(self, source: str, urdf_text: str):
        import torch
        import pytorch_kinematics as pk
        from pytorch_kinematics.urdf_parser_py.urdf import URDF

        self.source = source
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                robot = URDF.from_xml_string(urdf_text)  # the parser prints about tags it skips
                chain = pk.build_chain_from_urdf(urdf_text)
        except Exception as e:  # lxml syntax errors, assertions on missing attributes, ...
            raise IngestError(f"{source}: the URDF does not parse ({type(e).__name__}: {e})") from e
        self._chain = chain.to(dtype=torch.float64)
        self._torch = torch
        self._parent_joint = {j.child: j for j in robot.joints}  # link -> the joint that moves it
        self.links = [link.name for link in robot.links]
        self.joint_names = list(self._chain.get_joint_parameter_names())
        low, high = self._chain.get_joint_limits()
        self.limits = {name: (float(lo), float(hi)) for name, lo, hi in zip(self.joint_names, low, high)}
        self._frames = set(self._chain.get_frame_names(exclude_fixed=False))

    @classmethod
    def from_urdf(cls, path: str | Path) -> "RobotModel":
        path = Path(path)
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise IngestError(f"{path}: cannot read the URDF ({e})") from e
        return cls(str(path), text)

    def _path_to_root(self, link: str) -> list[str]:
        """The link and its ancestors up to the URDF's root."""
        if link not in self.links:
            raise IngestError(f"{self.source}: no link '{link}' in the URDF (links: {', '.join(self.links)})")
        path = [link]
        while path[-1] in self._parent_joint:
            path.append(self._parent_joint[path[-1]].parent)
        return path

    def chain_joints(self, base: str, tip: str) -> list[str]:
        """The movable joints between base and tip, from base towards tip."""
        up, down = self._path_to_root(base), self._path_to_root(tip)
        if up[-1] != down[-1] or base not in self._frames or tip not in self._frames:
            raise IngestError(f"{self.source}: links '{base}' and '{tip}' are not connected in the URDF")
        common = next(link for link in up if link in down)
        links = up[:up.index(common)] + list(reversed(down[:down.index(common)]))
        movable = [self._parent_joint[link] for link in links]
        return [j.name for j in movable if j.type != "fixed" and j.name in self.limits]

    def transforms(self, base: str, tip: str, positions: Mapping[str, np.ndarray]) -> np.ndarray:
        """base_T_tip (N, 4, 4) for joint positions given per joint name as (N,) arrays.

        Joints of the chain must all be given (NaN entries give NaN transforms); others count as 0.
        """
        needed = self.chain_joints(base, tip)
        missing = [name for name in needed if name not in positions]
        if missing:
            raise IngestError(f"{self.source}: no positions for joint(s) {', '.join(missing)}")
        n = len(next(iter(positions.values()))) if positions else 1
        q = np.zeros((n, len(self.joint_names)))
        for i, name in enumerate(self.joint_names):
            if name in positions:
                q[:, i] = positions[name]
        torch = self._torch
        frames = self._chain.forward_kinematics(torch.from_numpy(q), self._chain.get_frame_indices(base, tip))
        root_T_base = frames[base].get_matrix().numpy()
        root_T_tip = frames[tip].get_matrix().numpy()
        return act.invert_transforms(root_T_base) @ root_T_tip

    def joint_limits(self, joint: str) -> tuple[float, float]:
        """(lower, upper) of a movable joint; a finger joint is open at upper and closed at lower."""
        if joint not in self.limits:
            raise IngestError(f"{self.source}: no movable joint '{joint}' in the URDF "
                              f"(joints: {', '.join(self.joint_names)})")
        lower, upper = self.limits[joint]
        if not upper > lower:
            raise IngestError(f"{self.source}: joint '{joint}' has no usable limits ({lower}, {upper})")
        return lower, upper
