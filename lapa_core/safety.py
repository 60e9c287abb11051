"""What stands between a policy's output and the arm: unit conversion and the motion limits.

Pure numpy, no ROS, so every rule is unit-tested on its own and reused by any node:
- a 7-D end-effector delta per control step -> a twist in m/s and rad/s (scaled);
- NaN/inf anywhere -> refused (the caller stops the arm and aborts the goal);
- linear and angular speed clamps (the direction is kept, the magnitude capped);
- acceleration clamps (the change from the previous command is capped per second);
- a workspace box: the TCP's position is estimated from the last EE pose plus the motion commanded
  since it was measured, and each velocity component towards a wall is capped so that the TCP would
  cover at most the room left before that wall while this command may still be in force. That is
  the longer of WORKSPACE_LOOKAHEAD_PERIODS control periods and the servo's command timeout (MoveIt
  Servo keeps executing the last twist until its ``incoming_command_timeout``) plus ARM_STOP_LAG,
  so the box holds even when the next command never comes: the arm slows down as it nears a wall
  instead of relying on the next command arriving on time. A TCP already outside may only move
  back towards the box.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np

from lapa_core.node_params import POLICY_SERVER


class UnsafeCommand(ValueError):
    """The policy produced something that must not reach the arm (NaN, inf, wrong shape)."""


def _default(name: str):
    return POLICY_SERVER[name].default


@dataclass
class MotionLimits:
    """The policy server's motion limits; defaults are its parameters' (lapa_core.node_params)."""

    max_linear_speed: float = _default("max_linear_speed")  # m/s
    max_angular_speed: float = _default("max_angular_speed")  # rad/s
    max_linear_accel: float = _default("max_linear_accel")  # m/s^2
    max_angular_accel: float = _default("max_angular_accel")  # rad/s^2
    workspace_min: np.ndarray = field(default_factory=lambda: np.array(_default("workspace_min")))  # m, base frame
    workspace_max: np.ndarray = field(default_factory=lambda: np.array(_default("workspace_max")))
    # s the servo keeps executing the last twist when no new one comes (MoveIt Servo's
    # incoming_command_timeout; lapa_sim_arm's command_timeout)
    servo_command_timeout: float = _default("servo_command_timeout")

    @classmethod
    def from_params(cls, params: dict) -> "MotionLimits":
        """From the policy server's parameter values (ValueError when they contradict each other)."""
        return cls(**{f.name: params[f.name] for f in fields(cls)})

    def __post_init__(self):
        self.workspace_min = np.asarray(self.workspace_min, float)
        self.workspace_max = np.asarray(self.workspace_max, float)
        if self.workspace_min.shape != (3,) or self.workspace_max.shape != (3,):
            raise ValueError("workspace_min and workspace_max need 3 values (x, y, z in metres)")
        if np.any(self.workspace_min >= self.workspace_max):
            raise ValueError(f"workspace_min {self.workspace_min.tolist()} must be below workspace_max "
                             f"{self.workspace_max.tolist()} on every axis")
        for name in ("max_linear_speed", "max_angular_speed", "max_linear_accel", "max_angular_accel",
                     "servo_command_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")


def delta_to_twist(delta: np.ndarray, control_rate: float, linear_scale: float = 1.0,
                   angular_scale: float = 1.0) -> tuple[np.ndarray, float]:
    """A 7-D delta (dx dy dz [m/step], droll dpitch dyaw [rad/step], gripper closure 0..1) ->
    (twist [vx vy vz wx wy wz] in m/s and rad/s, gripper closure). Raises UnsafeCommand on NaN/inf."""
    delta = np.asarray(delta, dtype=float).reshape(-1)
    if delta.shape != (7,):
        raise UnsafeCommand(f"policy output has {delta.size} values, expected 7 (xyz, rpy, gripper)")
    if not np.all(np.isfinite(delta)):
        raise UnsafeCommand(f"policy output is not finite: {np.round(delta, 4).tolist()}")
    # For one control step the rpy increments are small: roll/pitch/yaw rates ~ angular velocity.
    twist = np.concatenate([delta[:3] * control_rate * linear_scale, delta[3:6] * control_rate * angular_scale])
    return twist, float(np.clip(delta[6], 0.0, 1.0))


def _cap(v: np.ndarray, limit: float) -> np.ndarray:
    n = float(np.linalg.norm(v))
    return v * (limit / n) if n > limit else v


# How far ahead, in control periods, the workspace box looks at least. One period is when the next
# command is due; the second covers a late command, a late pose and the arm's own lag.
WORKSPACE_LOOKAHEAD_PERIODS = 2.0
# s the arm goes on moving once its servo stops (the simulated Panda at 0.1 m/s: about 5 mm)
ARM_STOP_LAG = 0.05


class CommandLimiter:
    """Applies MotionLimits to a stream of twists sent every `period` seconds."""

    def __init__(self, limits: MotionLimits, period: float):
        self.limits, self.period = limits, period
        self.previous = np.zeros(6)
        # how long a command sent now may stay in force (see the module doc)
        self.horizon = max(WORKSPACE_LOOKAHEAD_PERIODS * period, limits.servo_command_timeout + ARM_STOP_LAG)

    def reset(self) -> None:
        """The arm is known to be still (a zero twist was just sent)."""
        self.previous = np.zeros(6)

    def __call__(self, twist: np.ndarray, tcp_pos: np.ndarray | None, pose_age: float = 0.0) -> np.ndarray:
        """The limited twist to send now. tcp_pos: the last measured TCP position (None: no
        workspace box); pose_age: seconds since it was measured (the TCP has moved on since, at the
        previously sent velocity, and that is accounted for)."""
        lim = self.limits
        twist = np.asarray(twist, dtype=float).copy()
        if not np.all(np.isfinite(twist)):
            raise UnsafeCommand("twist is not finite")
        lin, ang = _cap(twist[:3], lim.max_linear_speed), _cap(twist[3:], lim.max_angular_speed)
        prev = self.previous
        pos = None
        if tcp_pos is not None:
            pos = np.asarray(tcp_pos, float) + prev[:3] * max(float(pose_age), 0.0)
            lin = self._keep_inside(lin, pos)
        lin = prev[:3] + _cap(lin - prev[:3], lim.max_linear_accel * self.period)
        ang = prev[3:] + _cap(ang - prev[3:], lim.max_angular_accel * self.period)
        if pos is not None:  # the acceleration limit must not carry the TCP out either
            lin = self._keep_inside(lin, pos)
        self.previous = np.concatenate([lin, ang])
        return self.previous.copy()

    def _keep_inside(self, lin: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """Cap each velocity component towards a wall to the room left before it over the horizon;
        a component that points out of the box while the TCP is already past that wall becomes 0."""
        below = np.maximum(pos - self.limits.workspace_min, 0.0) / self.horizon  # fastest allowed speed downwards
        above = np.maximum(self.limits.workspace_max - pos, 0.0) / self.horizon  # ... and upwards
        return np.clip(lin, -below, above)

    def inside(self, pos: np.ndarray) -> bool:
        return bool(np.all(pos >= self.limits.workspace_min) and np.all(pos <= self.limits.workspace_max))
