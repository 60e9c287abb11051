"""7-D end-effector delta actions (see bag_format.ACTION_NAMES) from commanded twists, EE poses or transforms.

Pure numpy, no ROS. Times are int64 nanoseconds; every function takes the resampled control grid
``grid_ns`` (N,) and returns one row per step k = 0 .. N-2, the step from t_k to t_{k+1}. All
vectors are in the robot base frame:

- translation (dx, dy, dz): TCP displacement over the step [m];
- rotation (droll, dpitch, dyaw): roll/pitch/yaw ('sxyz', as transforms3d.euler.mat2euler) of
  R_delta, where R_{k+1} = R_delta @ R_k [rad];
- gripper: commanded closure, 0 open .. 1 closed.
"""

from __future__ import annotations

import numpy as np

NS = 1e-9  # seconds per nanosecond


# ---------------------------------------------------------------- rotations (vectorised)
def rotvec_to_matrix(rotvec: np.ndarray) -> np.ndarray:
    """Rotation vectors (n, 3) [rad, axis * angle] to rotation matrices (n, 3, 3) (Rodrigues)."""
    rotvec = np.asarray(rotvec, dtype=np.float64).reshape(-1, 3)
    theta = np.linalg.norm(rotvec, axis=1)
    small = theta < 1e-12
    axis = rotvec / np.where(small, 1.0, theta)[:, None]
    k = _skew(axis)
    s, c = np.sin(theta)[:, None, None], np.cos(theta)[:, None, None]
    mats = np.eye(3) + s * k + (1.0 - c) * (k @ k)
    mats[small] = np.eye(3) + _skew(rotvec[small])
    return mats


def matrix_to_rpy(mats: np.ndarray) -> np.ndarray:
    """Rotation matrices (n, 3, 3) to (roll, pitch, yaw) (n, 3), 'sxyz': R = Rz(yaw) Ry(pitch) Rx(roll).

    Same branches as transforms3d.euler.mat2euler(R, 'sxyz'), including the gimbal-lock case.
    """
    m = np.asarray(mats, dtype=np.float64).reshape(-1, 3, 3)
    cy = np.hypot(m[:, 0, 0], m[:, 1, 0])
    regular = cy > np.finfo(np.float64).eps * 4.0
    roll = np.where(regular, np.arctan2(m[:, 2, 1], m[:, 2, 2]), np.arctan2(-m[:, 1, 2], m[:, 1, 1]))
    pitch = np.arctan2(-m[:, 2, 0], cy)
    yaw = np.where(regular, np.arctan2(m[:, 1, 0], m[:, 0, 0]), 0.0)
    return np.stack([roll, pitch, yaw], axis=1)


def quat_to_matrix(quat_wxyz: np.ndarray) -> np.ndarray:
    """Quaternions (n, 4) in (w, x, y, z) order, normalised here, to rotation matrices (n, 3, 3)."""
    q = np.asarray(quat_wxyz, dtype=np.float64).reshape(-1, 4)
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], axis=1),
        np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], axis=1),
        np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], axis=1),
    ], axis=1)


def slerp(q0: np.ndarray, q1: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Spherical interpolation between unit quaternions q0, q1 (n, 4) at fractions u (n,) in [0, 1]."""
    q0 = q0 / np.linalg.norm(q0, axis=1, keepdims=True)
    q1 = q1 / np.linalg.norm(q1, axis=1, keepdims=True)
    dot = np.sum(q0 * q1, axis=1)
    q1 = np.where(dot[:, None] < 0, -q1, q1)  # shortest path
    dot = np.clip(np.abs(dot), -1.0, 1.0)
    omega = np.arccos(dot)
    sin_omega = np.sin(omega)
    near = sin_omega < 1e-9  # (almost) the same orientation: linear interpolation is exact enough
    safe = np.where(near, 1.0, sin_omega)
    w0 = np.where(near, 1.0 - u, np.sin((1.0 - u) * omega) / safe)
    w1 = np.where(near, u, np.sin(u * omega) / safe)
    q = w0[:, None] * q0 + w1[:, None] * q1
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def _skew(v: np.ndarray) -> np.ndarray:
    z = np.zeros(len(v))
    return np.stack([np.stack([z, -v[:, 2], v[:, 1]], 1),
                     np.stack([v[:, 2], z, -v[:, 0]], 1),
                     np.stack([-v[:, 1], v[:, 0], z], 1)], axis=1)


# ---------------------------------------------------------------- twists (MoveIt Servo semantics)
def integrate_held_commands(grid_ns: np.ndarray, cmd_ns: np.ndarray, values: np.ndarray,
                            stale_timeout_s: float) -> np.ndarray:
    """Integral of a zero-order-hold command signal over each grid step [t_k, t_{k+1}).

    Command i (value values[i], e.g. a velocity) holds from cmd_ns[i] until the next command, but
    at most stale_timeout_s (then it counts as zero, as MoveIt Servo halts on stale commands).
    Before the first command the signal is zero. Returns (N-1, D): value * seconds per step.
    """
    grid_ns = np.asarray(grid_ns, dtype=np.int64)
    values = np.asarray(values, dtype=np.float64).reshape(len(cmd_ns), -1)
    n_steps = max(len(grid_ns) - 1, 0)
    if len(cmd_ns) == 0 or n_steps == 0:
        return np.zeros((n_steps, values.shape[1]))
    order = np.argsort(cmd_ns, kind="stable")
    origin = int(grid_ns[0])
    start = (np.asarray(cmd_ns, dtype=np.int64)[order] - origin) * NS  # seconds from t_0
    values = values[order]
    end = np.minimum(np.append(start[1:], np.inf), start + stale_timeout_s)
    length = end - start
    # F(t) = integral of the signal up to t: piecewise linear, F(start_i) = cumulative[i]
    cumulative = np.concatenate([np.zeros((1, values.shape[1])), np.cumsum(values * length[:, None], axis=0)[:-1]])
    t = (grid_ns - origin) * NS
    i = np.searchsorted(start, t, side="right") - 1
    active = i >= 0
    ic = np.maximum(i, 0)
    f = cumulative[ic] + values[ic] * np.clip(t - start[ic], 0.0, length[ic])[:, None]
    f[~active] = 0.0
    return np.diff(f, axis=0)


def twist_deltas(grid_ns: np.ndarray, cmd_ns: np.ndarray, linear: np.ndarray, angular: np.ndarray,
                 stale_timeout_s: float = 0.25) -> np.ndarray:
    """(dx, dy, dz, droll, dpitch, dyaw) per step (N-1, 6) from base-frame twist commands.

    linear (n, 3) [m/s] and angular (n, 3) [rad/s] are held as in integrate_held_commands;
    translation = integral of v, rotation = rpy of the rotation vector integral of w.
    """
    held = integrate_held_commands(grid_ns, cmd_ns, np.hstack([linear, angular]), stale_timeout_s)
    return np.hstack([held[:, :3], matrix_to_rpy(rotvec_to_matrix(held[:, 3:]))])


# ---------------------------------------------------------------- poses
def interpolate_poses(t_ns: np.ndarray, pose_ns: np.ndarray, position: np.ndarray, quat_wxyz: np.ndarray,
                      max_outside_ns: int, max_gap_ns: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pose at times t_ns: position interpolated linearly, orientation by slerp.

    Times before the first or after the last pose are clamped to it when within max_outside_ns,
    otherwise NaN; so are times inside a gap between poses longer than max_gap_ns (when given).
    Returns positions (n, 3) and quaternions (n, 4, w x y z).
    """
    order = np.argsort(pose_ns, kind="stable")
    pose_ns = np.asarray(pose_ns, dtype=np.int64)[order]
    position, quat_wxyz = np.asarray(position, float)[order], np.asarray(quat_wxyz, float)[order]
    t_ns = np.asarray(t_ns, dtype=np.int64)
    outside = (t_ns < pose_ns[0] - max_outside_ns) | (t_ns > pose_ns[-1] + max_outside_ns)
    t = np.clip(t_ns, pose_ns[0], pose_ns[-1])
    if len(pose_ns) == 1:
        lo = hi = np.zeros(len(t), dtype=np.int64)
    else:
        hi = np.clip(np.searchsorted(pose_ns, t, side="right"), 1, len(pose_ns) - 1)
        lo = hi - 1
    span = (pose_ns[hi] - pose_ns[lo]).astype(np.float64)
    u = np.clip(np.where(span > 0, (t - pose_ns[lo]) / np.where(span > 0, span, 1.0), 0.0), 0.0, 1.0)
    if max_gap_ns is not None:
        outside |= (span > max_gap_ns) & (t > pose_ns[lo]) & (t < pose_ns[hi])
    pos = position[lo] + u[:, None] * (position[hi] - position[lo])
    quat = slerp(quat_wxyz[lo], quat_wxyz[hi], u)
    pos[outside] = np.nan
    quat[outside] = np.nan
    return pos, quat


def pose_deltas(grid_ns: np.ndarray, pose_ns: np.ndarray, position: np.ndarray, quat_wxyz: np.ndarray,
                max_outside_ns: int) -> np.ndarray:
    """(dx, dy, dz, droll, dpitch, dyaw) per step (N-1, 6) from base-frame TCP poses.

    Poses are interpolated at every t_k (see interpolate_poses); translation = p_{k+1} - p_k,
    rotation = rpy of R_{k+1} @ R_k^T. Steps touching a time outside the poses are NaN.
    """
    pos, quat = interpolate_poses(grid_ns, pose_ns, position, quat_wxyz, max_outside_ns)
    valid = np.isfinite(quat).all(axis=1)
    mats = np.tile(np.eye(4), (len(pos), 1, 1))
    mats[:, :3, :3] = quat_to_matrix(np.where(valid[:, None], quat, [1.0, 0.0, 0.0, 0.0]))
    mats[:, :3, 3] = pos
    mats[~valid] = np.nan
    return transform_deltas(mats)


def transform_deltas(base_T_tcp: np.ndarray) -> np.ndarray:
    """(dx, dy, dz, droll, dpitch, dyaw) per step (N-1, 6) from TCP poses (N, 4, 4) at the grid times.

    translation = p_{k+1} - p_k, rotation = rpy of R_{k+1} @ R_k^T; NaN where either pose is NaN.
    """
    mats = np.asarray(base_T_tcp, dtype=np.float64).reshape(-1, 4, 4)
    out = np.full((max(len(mats) - 1, 0), 6), np.nan)
    if len(out) == 0:
        return out
    valid = np.isfinite(mats).all(axis=(1, 2))
    ok = valid[:-1] & valid[1:]
    rot = np.where(valid[:, None, None], mats[:, :3, :3], np.eye(3))
    out[:, :3] = mats[1:, :3, 3] - mats[:-1, :3, 3]
    out[:, 3:] = matrix_to_rpy(rot[1:] @ np.transpose(rot[:-1], (0, 2, 1)))
    out[~ok] = np.nan
    return out


def invert_transforms(mats: np.ndarray) -> np.ndarray:
    """Inverses of rigid transforms (n, 4, 4): [R^T, -R^T p]; NaN stays NaN."""
    mats = np.asarray(mats, dtype=np.float64)
    out = np.tile(np.eye(4), (len(mats), 1, 1))
    rot_t = np.transpose(mats[:, :3, :3], (0, 2, 1))
    out[:, :3, :3] = rot_t
    out[:, :3, 3] = -np.einsum("nij,nj->ni", rot_t, mats[:, :3, 3])
    out[~np.isfinite(mats).all(axis=(1, 2))] = np.nan
    return out


def rotate_to_base(vectors: np.ndarray, at_ns: np.ndarray, pose_ns: np.ndarray, quat_wxyz: np.ndarray,
                   max_outside_ns: int) -> np.ndarray:
    """Vectors (n, 3) expressed in the TCP frame at times at_ns, rotated into the base frame.

    The TCP orientation is the EE pose orientation interpolated at each time (slerp); NaN where
    no pose is near enough.
    """
    zeros = np.zeros((len(pose_ns), 3))
    _, quat = interpolate_poses(at_ns, pose_ns, zeros, quat_wxyz, max_outside_ns)
    valid = np.isfinite(quat).all(axis=1)
    rot = quat_to_matrix(np.where(valid[:, None], quat, [1.0, 0.0, 0.0, 0.0]))
    out = np.einsum("nij,nj->ni", rot, np.asarray(vectors, float))
    out[~valid] = np.nan
    return out


# ---------------------------------------------------------------- gripper
def gripper_closure(grid_ns: np.ndarray, cmd_ns: np.ndarray, opening: np.ndarray,
                    open_value: float = 1.0, closed_value: float = 0.0) -> np.ndarray:
    """Commanded closure per step (N-1,): 0 open .. 1 closed.

    Step k takes the latest command stamped strictly before t_{k+1}, i.e. the command in force at
    the end of [t_k, t_{k+1}) (a command stamped exactly t_{k+1} belongs to the next step).
    The opening is mapped linearly (open_value -> 0, closed_value -> 1) and clipped to [0, 1].
    NaN before the first command.
    """
    n_steps = max(len(grid_ns) - 1, 0)
    out = np.full(n_steps, np.nan)
    if len(cmd_ns) == 0 or n_steps == 0:
        return out
    if open_value == closed_value:
        raise ValueError("gripper open and closed values must differ")
    order = np.argsort(cmd_ns, kind="stable")
    cmd_ns = np.asarray(cmd_ns, dtype=np.int64)[order]
    closure = np.clip((open_value - np.asarray(opening, float)[order]) / (open_value - closed_value), 0.0, 1.0)
    i = np.searchsorted(cmd_ns, np.asarray(grid_ns, dtype=np.int64)[1:], side="left") - 1
    out[i >= 0] = closure[i[i >= 0]]
    return out
