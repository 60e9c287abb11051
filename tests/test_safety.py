"""The motion limits on their own (pure numpy): speed caps, the workspace box under late poses
and late commands, and a TCP that starts outside the box."""

import numpy as np
import pytest

from lapa_core.safety import CommandLimiter, MotionLimits, UnsafeCommand

PERIOD = 0.1
FLOOR = 0.37


def _limits(**kw) -> MotionLimits:
    return MotionLimits(**{"workspace_min": [0.0, -1.0, FLOOR], "workspace_max": [1.0, 1.0, 1.0], **kw})


SERVO_TIMEOUT = 0.25  # s the simulated servo keeps executing a command when no new one comes


def _drive_down(seed: int, *, pose_delay: tuple[float, float], command_gap: tuple[float, float],
                use_pose_age: bool = True, limiter_servo_timeout: float = SERVO_TIMEOUT,
                steps: int = 40) -> np.ndarray:
    """A point arm at z 0.40 is driven straight down at 0.1 m/s towards the floor at 0.37. Every
    command is computed from a pose measured `pose_delay` s ago and holds until the next command,
    `command_gap` s later (both drawn per step), or until the servo's timeout (SERVO_TIMEOUT).
    The limiter is told the servo's timeout is limiter_servo_timeout. Returns the arm's true z on a
    1 ms grid."""
    rng = np.random.default_rng(seed)
    limiter = CommandLimiter(_limits(servo_command_timeout=limiter_servo_timeout), PERIOD)
    dt = 0.001
    z = [0.40]  # true z at every ms
    for _ in range(steps):
        age = rng.uniform(*pose_delay)
        measured = z[max(len(z) - 1 - int(round(age / dt)), 0)]
        vz = limiter(np.array([0, 0, -0.1, 0, 0, 0]), np.array([0.5, 0.0, measured]),
                     age if use_pose_age else 0.0)[2]
        for k in range(int(round(rng.uniform(*command_gap) / dt))):
            z.append(z[-1] + (vz * dt if k * dt < SERVO_TIMEOUT else 0.0))
    return np.asarray(z)


@pytest.mark.parametrize("seed", range(5))
def test_the_box_holds_with_late_poses_and_late_commands(seed):
    z = _drive_down(seed, pose_delay=(0.0, 0.15), command_gap=(PERIOD, 1.5 * PERIOD))
    assert z.min() > FLOOR - 0.001, f"went {1000 * (FLOOR - z.min()):.1f} mm through the floor"
    assert z[-1] < FLOOR + 0.003  # it still gets close to the wall: the box slows it, it does not freeze it


@pytest.mark.parametrize("seed", range(5))
def test_the_box_holds_when_the_next_command_comes_late_or_never(seed):
    """A stalled control loop (commands up to 0.4 s apart, measured: the server's loop stalled up to
    1.2 s under a busy executor): the servo goes on with the last command until its timeout."""
    z = _drive_down(seed, pose_delay=(0.0, 0.05), command_gap=(PERIOD, 4 * PERIOD))
    assert z.min() > FLOOR - 0.001, f"went {1000 * (FLOOR - z.min()):.1f} mm through the floor"


def test_a_box_that_looks_only_two_periods_ahead_fails_when_commands_stall():
    """The reason the limiter is told the servo's timeout: planning for the next command on time
    (2 periods) lets a stall carry the TCP through the floor."""
    worst = min(_drive_down(seed, pose_delay=(0.0, 0.05), command_gap=(PERIOD, 4 * PERIOD),
                            limiter_servo_timeout=0.01).min() for seed in range(5))
    assert worst < FLOOR - 0.002


def test_ignoring_the_pose_age_lets_a_late_pose_carry_the_tcp_through_the_floor():
    """The reason the limiter takes pose_age: without it the same run goes through the floor."""
    z = _drive_down(0, pose_delay=(0.15, 0.15), command_gap=(PERIOD, 1.5 * PERIOD), use_pose_age=False)
    assert z.min() < FLOOR - 0.002


def test_a_tcp_outside_may_move_back_in_but_not_further_out():
    limiter = CommandLimiter(_limits(max_linear_accel=100.0), PERIOD)
    below = np.array([0.5, 0.0, FLOOR - 0.02])
    down = limiter(np.array([0.05, 0, -0.1, 0, 0, 0]), below)
    assert down[2] == 0.0 and down[0] == pytest.approx(0.05)  # sideways motion is not a wall's business
    up = limiter(np.array([0, 0, 0.1, 0, 0, 0]), below)
    assert up[2] == pytest.approx(0.1)
    still = limiter(np.zeros(6), below)
    assert np.allclose(still, 0)  # the box never moves the arm by itself


def test_speed_caps_keep_the_direction_and_acceleration_is_limited():
    limits = _limits(max_linear_speed=0.15, max_linear_accel=1.0)
    limiter = CommandLimiter(limits, PERIOD)
    first = limiter(np.array([0.3, 0.4, 0, 0, 0, 0]), None)
    assert np.linalg.norm(first[:3]) == pytest.approx(1.0 * PERIOD)  # accel-limited from rest
    for _ in range(5):
        out = limiter(np.array([0.3, 0.4, 0, 0, 0, 0]), None)
    assert np.linalg.norm(out[:3]) == pytest.approx(0.15)
    assert out[1] / out[0] == pytest.approx(0.4 / 0.3)
    with pytest.raises(UnsafeCommand):
        limiter(np.array([np.nan, 0, 0, 0, 0, 0]), None)
