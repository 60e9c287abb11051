"""End-effector twist → joint motion, the way MoveIt Servo does it.

Servo takes a Cartesian twist for the end effector, maps it to joint velocities with a damped
least-squares Jacobian inverse, scales the whole motion down when any joint would exceed its
velocity limit (keeping the direction), halts when a joint would leave its position limits, and
halts when commands stop arriving (``incoming_command_timeout``). This class does the same on the
simulated arm and writes joint position targets for the arm's position servos.

``MocapServo`` gives the floating-gripper embodiment the same interface and the same rules (speed
caps, timeout, limits) with a pose target instead of joint targets.
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


class _TwistInput:
    """What every servo shares: the latest twist command, its speed limits and its timeout."""

    limits: ServoLimits
    _twist: np.ndarray
    _stamp: float
    halted_reason: str

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

    def _halt_reason(self, now: float) -> str:
        """Why the servo must hold still now ("" when it may move)."""
        if now - self._stamp > self.limits.command_timeout:
            return "stale command" if np.isfinite(self._stamp) else "no command yet"
        if not np.any(self._twist):
            return "zero command"
        return ""


class TwistServo(_TwistInput):
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

    def place_tcp(self, pos: np.ndarray, iterations: int = 60) -> float:
        """Set the arm's joints (kinematically, no physics) so the TCP is at pos with the
        orientation it has now: damped least squares from the current joints. Returns the
        remaining position error (m)."""
        m, d = self.model, self.data
        target_rot = d.site_xmat[self.site_id].reshape(3, 3).copy()
        lam2 = self.limits.damping ** 2
        for _ in range(iterations):
            mujoco.mj_kinematics(m, d)
            mujoco.mj_comPos(m, d)
            err_p = pos - d.site_xpos[self.site_id]
            r = target_rot @ d.site_xmat[self.site_id].reshape(3, 3).T  # rotation still to go
            err_r = 0.5 * np.array([r[2, 1] - r[1, 2], r[0, 2] - r[2, 0], r[1, 0] - r[0, 1]])
            if np.linalg.norm(err_p) < 1e-4 and np.linalg.norm(err_r) < 1e-3:
                break
            mujoco.mj_jacSite(m, d, self._jacp, self._jacr, self.site_id)
            jac = np.vstack([self._jacp[:, self.dof_idx], self._jacr[:, self.dof_idx]])
            dq = jac.T @ np.linalg.solve(jac @ jac.T + lam2 * np.eye(6), np.concatenate([err_p, err_r]))
            q = d.qpos[self.qpos_idx] + dq
            d.qpos[self.qpos_idx] = np.clip(q, self.q_low + self.limits.joint_limit_margin,
                                            self.q_high - self.limits.joint_limit_margin)
        mujoco.mj_kinematics(m, d)
        return float(np.linalg.norm(pos - d.site_xpos[self.site_id]))

    def _hold(self, q: np.ndarray) -> np.ndarray:
        """Hold still: keep the commanded targets, but never further than the windup bound."""
        err = self.limits.max_tracking_error
        return np.clip(self.q_cmd, q - err, q + err)


class MocapServo(_TwistInput):
    """The same twist interface for a free-floating hand: integrates twists into a target pose.

    The hand is welded to a mocap body; update() returns the target TCP pose [x y z qw qx qy qz]
    for it. As on the arm: speeds are capped, stale or zero commands hold the hand where it is, the
    target never runs more than max_position_error / max_rotation_error ahead of the measured pose
    (anti-windup, e.g. while pressing on the table), and a workspace box plays the joint limits.
    """

    def __init__(self, model: mujoco.MjModel, data: mujoco.MjData, site: str = "tcp",
                 limits: ServoLimits | None = None,
                 workspace: tuple[tuple[float, float], ...] = ((0.1, 0.95), (-0.6, 0.6), (0.0, 0.75)),
                 max_position_error: float = 0.02, max_rotation_error: float = 0.15):
        self.model, self.data = model, data
        self.limits = limits or ServoLimits()
        self.site_id = model.site(site).id
        self.workspace = np.asarray(workspace, dtype=float)
        self.max_position_error, self.max_rotation_error = max_position_error, max_rotation_error
        self._twist = np.zeros(6)
        self._stamp = -np.inf
        self.halted_reason = "no command yet"
        self.pos_cmd, self.quat_cmd = self._measured()

    def _measured(self) -> tuple[np.ndarray, np.ndarray]:
        quat = np.empty(4)
        mujoco.mju_mat2Quat(quat, self.data.site_xmat[self.site_id])
        return self.data.site_xpos[self.site_id].copy(), quat

    def reset(self) -> None:
        self.pos_cmd, self.quat_cmd = self._measured()
        self._twist[:] = 0.0
        self._stamp = -np.inf
        self.halted_reason = "no command yet"

    @property
    def target(self) -> np.ndarray:
        return np.concatenate([self.pos_cmd, self.quat_cmd])

    def update(self, dt: float, now: float) -> np.ndarray:
        """Advance the target pose by one servo period; returns it as [x y z qw qx qy qz]."""
        pos, quat = self._measured()
        self.halted_reason = self._halt_reason(now)
        if not self.halted_reason:
            v, w = self._twist[:3], self._twist[3:]
            pos_next = self.pos_cmd + v * dt
            low, high = self.workspace[:, 0], self.workspace[:, 1]
            leaving = ((pos_next < low) & (v < 0)) | ((pos_next > high) & (v > 0))
            if np.any(leaving):
                self.halted_reason = f"workspace limit ({', '.join('xyz'[i] for i in np.flatnonzero(leaving))})"
            else:
                self.pos_cmd = pos_next
                angle = np.linalg.norm(w) * dt
                if angle > 0:
                    turn = np.empty(4)
                    mujoco.mju_axisAngle2Quat(turn, w / np.linalg.norm(w), angle)
                    mujoco.mju_mulQuat(self.quat_cmd, turn, self.quat_cmd.copy())  # base-frame rate: turn first
                    mujoco.mju_normalize4(self.quat_cmd)
        self._clamp_to(pos, quat)
        return self.target

    def _clamp_to(self, pos: np.ndarray, quat: np.ndarray) -> None:
        """Keep the target within the windup bounds of the measured pose."""
        err = self.pos_cmd - pos
        dist = np.linalg.norm(err)
        if dist > self.max_position_error:
            self.pos_cmd = pos + err * (self.max_position_error / dist)
        # rotation from measured to commanded, as a base-frame axis and angle
        conj, rel = np.empty(4), np.empty(4)
        mujoco.mju_negQuat(conj, quat)
        mujoco.mju_mulQuat(rel, self.quat_cmd, conj)
        if rel[0] < 0:
            rel = -rel
        angle = 2.0 * np.arctan2(np.linalg.norm(rel[1:]), rel[0])
        if angle > self.max_rotation_error:
            turn = np.empty(4)
            mujoco.mju_axisAngle2Quat(turn, rel[1:] / np.linalg.norm(rel[1:]), self.max_rotation_error)
            mujoco.mju_mulQuat(self.quat_cmd, turn, quat)
