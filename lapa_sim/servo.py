"""End-effector twist → joint motion, the way MoveIt Servo does it.

Servo takes a Cartesian twist for the end effector, maps it to joint velocities with a damped
least-squares Jacobian inverse, scales the whole motion down when any joint would exceed its
velocity limit (keeping the direction), halts when a joint would leave its position limits, and
halts when commands stop arriving (``incoming_command_timeout``). This class does the same on the
simulated arm and writes joint position targets for the arm's position servos.
"""

from __future__ import annotations

from dataclasses import dataclass

import mujoco
import numpy as np

from lapa_sim.scene import ARM_JOINTS, HOME_Q


@dataclass
class ServoLimits:
    max_linear_speed: float = 0.25  # m/s, commands beyond this are scaled down
    max_angular_speed: float = 1.2  # rad/s
    joint_limit_margin: float = 0.05  # rad, halt before a joint gets this close to its limit
    command_timeout: float = 0.25  # s without a command → halt (Servo's incoming_command_timeout)
    damping: float = 0.03  # damped least squares: lambda at singularities
    nullspace_gain: float = 0.5  # pull towards the home posture in the Jacobian's null space
    max_tracking_error: float = 0.05  # rad, anti-windup between commanded and measured joints


class TwistServo:
    """Integrates end-effector twists (base frame) into arm joint position targets."""

    def __init__(self, model: mujoco.MjModel, data: mujoco.MjData, site: str = "tcp",
                 limits: ServoLimits | None = None):
        self.model, self.data = model, data
        self.limits = limits or ServoLimits()
        self.site_id = model.site(site).id
        joints = [model.joint(n) for n in ARM_JOINTS]
        self.qpos_idx = np.array([j.qposadr[0] for j in joints])
        self.dof_idx = np.array([j.dofadr[0] for j in joints])
        self.q_low = np.array([j.range[0] for j in joints])
        self.q_high = np.array([j.range[1] for j in joints])
        # Velocity limits from the URDF (mujoco does not keep them): Panda's published values.
        self.qd_max = np.array([2.175, 2.175, 2.175, 2.175, 2.61, 2.61, 2.61])
        self.q_cmd = self.data.qpos[self.qpos_idx].copy()
        self._twist = np.zeros(6)
        self._stamp = -np.inf
        self.halted_reason = "no command yet"
        self._jacp = np.zeros((3, model.nv))
        self._jacr = np.zeros((3, model.nv))

    def reset(self) -> None:
        self.q_cmd = self.data.qpos[self.qpos_idx].copy()
        self._twist[:] = 0.0
        self._stamp = -np.inf
        self.halted_reason = "no command yet"

    def command(self, twist: np.ndarray, now: float) -> None:
        """Set the twist [vx vy vz wx wy wz] (base frame, m/s and rad/s), received at time now."""
        twist = np.asarray(twist, dtype=float).reshape(6)
        if not np.all(np.isfinite(twist)):
            raise ValueError("twist contains NaN or inf")
        v, w = twist[:3], twist[3:]
        lin, ang = np.linalg.norm(v), np.linalg.norm(w)
        if lin > self.limits.max_linear_speed:
            v = v * (self.limits.max_linear_speed / lin)
        if ang > self.limits.max_angular_speed:
            w = w * (self.limits.max_angular_speed / ang)
        self._twist = np.concatenate([v, w])
        self._stamp = now

    def stop(self) -> None:
        """Forget the current command: the arm holds where it is."""
        self._twist[:] = 0.0
        self._stamp = -np.inf

    @property
    def is_moving(self) -> bool:
        return self.halted_reason == ""

    def update(self, dt: float, now: float) -> np.ndarray:
        """Advance the joint targets by one servo period; returns the targets (also kept in q_cmd)."""
        q = self.data.qpos[self.qpos_idx]
        if now - self._stamp > self.limits.command_timeout:
            self.halted_reason = "stale command" if np.isfinite(self._stamp) else "no command yet"
            self.q_cmd = self._hold(q)
            return self.q_cmd
        if not np.any(self._twist):
            self.halted_reason = "zero command"
            self.q_cmd = self._hold(q)
            return self.q_cmd

        mujoco.mj_jacSite(self.model, self.data, self._jacp, self._jacr, self.site_id)
        jac = np.vstack([self._jacp[:, self.dof_idx], self._jacr[:, self.dof_idx]])
        lam2 = self.limits.damping ** 2
        jjt = jac @ jac.T + lam2 * np.eye(6)
        qd = jac.T @ np.linalg.solve(jjt, self._twist)
        # Redundancy: drift towards the home posture without disturbing the end effector.
        j_pinv = jac.T @ np.linalg.inv(jjt)
        qd += (np.eye(7) - j_pinv @ jac) @ (self.limits.nullspace_gain * (HOME_Q - q))

        ratio = np.max(np.abs(qd) / self.qd_max)
        if ratio > 1.0:
            qd /= ratio  # keep the direction of motion, like Servo's velocity scaling

        q_next = self.q_cmd + qd * dt
        margin = self.limits.joint_limit_margin
        leaving = ((q_next < self.q_low + margin) & (qd < 0)) | ((q_next > self.q_high - margin) & (qd > 0))
        if np.any(leaving):
            names = ", ".join(ARM_JOINTS[i] for i in np.flatnonzero(leaving))
            self.halted_reason = f"joint limit ({names})"
            self.q_cmd = self._hold(q)
            return self.q_cmd
        err = self.limits.max_tracking_error
        self.q_cmd = np.clip(q_next, q - err, q + err)
        self.halted_reason = ""
        return self.q_cmd

    def _hold(self, q: np.ndarray) -> np.ndarray:
        """Hold still: keep the commanded targets, but never further than the windup bound."""
        err = self.limits.max_tracking_error
        return np.clip(self.q_cmd, q - err, q + err)
