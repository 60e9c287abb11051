"""A scripted expert that solves every task through the same interface a policy has.

It reads the observation (TCP pose, gripper, block poses) and returns what a teleoperator or
policy would send: an end-effector twist in the base frame and a gripper opening. Each task is a
short list of waypoints; the expert servos to each with a capped proportional law and moves on
when it is close. ``noise`` adds smooth random perturbations so demonstrations are diverse.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import transforms3d

from lapa_sim.env import Observation
from lapa_sim.scene import BLOCK_HALF
from lapa_sim.tasks import DIRECTIONS, PUSH_DISTANCE, Episode

OPEN, CLOSED = 1.0, 0.0
HOVER = 0.12  # m above the table for travel


@dataclass
class Waypoint:
    pos: np.ndarray
    gripper: float
    tol: float = 0.01  # m
    wait: float = 0.0  # s to stay once reached (e.g. for the gripper to close)
    speed: float = 0.15  # m/s cap


class ScriptedExpert:
    def __init__(self, episode: Episode, noise: float = 0.0, seed: int = 0,
                 max_speed: float = 0.15, gain: float = 3.0):
        self.ep = episode
        self.noise = noise
        self.rng = np.random.default_rng(seed)
        self.max_speed, self.gain = max_speed, gain
        self._plan: list[Waypoint] | None = None
        self._index = 0
        self._reached_at: float | None = None
        self._yaw = 0.0
        self._drift = np.zeros(3)

    @property
    def done(self) -> bool:
        return self._plan is not None and self._index >= len(self._plan)

    def _make_plan(self, obs: Observation) -> list[Waypoint]:
        ep = self.ep
        b = obs.block_pos[ep.target_block].copy()
        top = b[2] + BLOCK_HALF
        _, _, yaw = transforms3d.euler.quat2euler(obs.block_quat[ep.target_block], "sxyz")
        # the gripper is symmetric: align with the block's nearest face
        self._yaw = (yaw + np.pi / 4) % (np.pi / 2) - np.pi / 4
        if ep.task == "reach":
            return [Waypoint(np.array([b[0], b[1], top + 0.08]), OPEN, tol=0.015),
                    Waypoint(np.array([b[0], b[1], top + 0.02]), OPEN, tol=0.006, wait=0.3, speed=0.08)]
        if ep.task == "push":
            u = np.array([*DIRECTIONS[ep.direction], 0.0])
            behind = b - u * (BLOCK_HALF + 0.045)
            low = BLOCK_HALF * 0.8
            goal = b + u * (PUSH_DISTANCE + 0.025)
            self._yaw = 0.0 if abs(u[0]) > 0 else np.pi / 2  # push with the flat of the fingers
            return [Waypoint(np.array([behind[0], behind[1], HOVER]), CLOSED, tol=0.015),
                    Waypoint(np.array([behind[0], behind[1], low]), CLOSED, tol=0.008, speed=0.1),
                    Waypoint(np.array([goal[0] - u[0] * (BLOCK_HALF + 0.02), goal[1] - u[1] * (BLOCK_HALF + 0.02), low]),
                             CLOSED, tol=0.008, speed=0.08),
                    Waypoint(np.array([goal[0] - u[0] * 0.1, goal[1] - u[1] * 0.1, HOVER]), CLOSED, tol=0.02)]
        if ep.task == "pick_place":
            pad = np.array([*ep.pad_xy, 0.0])
            grasp_z = b[2] + 0.003
            place_z = BLOCK_HALF + 0.012
            return [Waypoint(np.array([b[0], b[1], HOVER]), OPEN, tol=0.012),
                    Waypoint(np.array([b[0], b[1], grasp_z]), OPEN, tol=0.006, speed=0.1),
                    Waypoint(np.array([b[0], b[1], grasp_z]), CLOSED, tol=0.01, wait=0.5),
                    Waypoint(np.array([b[0], b[1], HOVER]), CLOSED, tol=0.015),
                    Waypoint(np.array([pad[0], pad[1], HOVER]), CLOSED, tol=0.012),
                    Waypoint(np.array([pad[0], pad[1], place_z]), CLOSED, tol=0.008, speed=0.08),
                    Waypoint(np.array([pad[0], pad[1], place_z]), OPEN, tol=0.02, wait=0.4),
                    Waypoint(np.array([pad[0], pad[1], HOVER]), OPEN, tol=0.02)]
        raise ValueError(f"no expert for task {ep.task}")

    def act(self, obs: Observation) -> tuple[np.ndarray, float]:
        """Twist [vx vy vz wx wy wz] (base frame) and gripper opening for this observation."""
        if self._plan is None:
            self._plan = self._make_plan(obs)
        if self.done:
            return np.zeros(6), self._plan[-1].gripper
        wp = self._plan[self._index]
        err = wp.pos - obs.tcp_pos
        if np.linalg.norm(err) < wp.tol:
            if self._reached_at is None:
                self._reached_at = obs.time
            if obs.time - self._reached_at >= wp.wait:
                self._index += 1
                self._reached_at = None
                return self.act(obs)
        v = self.gain * err
        if self.noise > 0:
            self._drift = 0.8 * self._drift + 0.2 * self.rng.normal(0, self.noise, 3)
            v = v + self._drift * min(1.0, np.linalg.norm(err) / 0.05)
        speed = np.linalg.norm(v)
        cap = min(wp.speed, self.max_speed)
        if speed > cap:
            v *= cap / speed
        return np.concatenate([v, self._orientation_rate(obs)]), wp.gripper

    def _orientation_rate(self, obs: Observation) -> np.ndarray:
        """Angular velocity (base frame) that turns the TCP to point down with the plan's yaw."""
        target = transforms3d.euler.euler2mat(np.pi, 0.0, self._yaw, "sxyz")
        current = transforms3d.quaternions.quat2mat(obs.tcp_quat)
        axis, angle = transforms3d.axangles.mat2axangle(target @ current.T)
        w = 2.0 * axis * angle
        n = np.linalg.norm(w)
        return w * (0.8 / n) if n > 0.8 else w
