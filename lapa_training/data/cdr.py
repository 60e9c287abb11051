"""Direct readers for the few CDR messages ingest sees once per control step.

A bag of a 10 Hz episode holds one image, one twist and one gripper command per step (and /tf or
/joint_states at tens of Hz); reading their
fields straight from the CDR bytes (no message objects, image pixels as a view, not a copy) is what
keeps ingest close to the speed of a bare read of the bag. Every other type goes through the
rosbags typestore. Layouts follow the OMG CDR rules ROS 2 uses: a 4-byte encapsulation header
(byte 1: 1 = little-endian, 0 = big-endian), then fields aligned to their size relative to the end
of that header. tests/test_ingest.py checks these against the typestore for both byte orders.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

import numpy as np

_STAMP = {True: struct.Struct("<iI"), False: struct.Struct(">iI")}
_HEADER = {True: struct.Struct("<iII"), False: struct.Struct(">iII")}  # sec, nanosec, frame_id length
_TWO_U32 = {True: struct.Struct("<II"), False: struct.Struct(">II")}
_THREE_U32 = {True: struct.Struct("<III"), False: struct.Struct(">III")}
_SIX_DOUBLES = {True: struct.Struct("<6d"), False: struct.Struct(">6d")}
_DOUBLE = {True: struct.Struct("<d"), False: struct.Struct(">d")}
_U32 = {True: struct.Struct("<I"), False: struct.Struct(">I")}
_SEVEN_DOUBLES = {True: struct.Struct("<7d"), False: struct.Struct(">7d")}


class ImageFields(NamedTuple):
    stamp_ns: int
    frame_id: str
    height: int
    width: int
    encoding: str
    is_bigendian: int
    step: int
    data: memoryview  # the pixel bytes, a view into the message


def _little(raw) -> bool:
    if raw[0] != 0 or raw[1] not in (0, 1):
        raise ValueError("not a plain CDR message (unsupported encapsulation)")
    return raw[1] == 1


def _align(pos: int, size: int) -> int:
    return pos + (-(pos - 4)) % size


def _header(raw, le: bool) -> tuple[int, str, int]:
    """(stamp [ns], frame_id, offset after the header) of a message that starts with std_msgs/Header."""
    sec, nanosec, n = _HEADER[le].unpack_from(raw, 4)
    frame_id = bytes(raw[16:16 + n]).rstrip(b"\0").decode("utf-8", "replace")
    return sec * 1_000_000_000 + nanosec, frame_id, 16 + n


def header_stamp_ns(raw) -> int:
    """The header stamp [ns] of any message that starts with a std_msgs/Header."""
    sec, nanosec = _STAMP[_little(raw)].unpack_from(raw, 4)
    return sec * 1_000_000_000 + nanosec


def image(raw) -> ImageFields:
    """sensor_msgs/msg/Image."""
    le = _little(raw)
    stamp, frame_id, pos = _header(raw, le)
    pos = _align(pos, 4)
    height, width, n = _THREE_U32[le].unpack_from(raw, pos)
    encoding = bytes(raw[pos + 12:pos + 12 + n]).rstrip(b"\0").decode("utf-8", "replace")
    pos += 12 + n
    is_bigendian = raw[pos]
    pos = _align(pos + 1, 4)
    step, size = _TWO_U32[le].unpack_from(raw, pos)
    start = pos + 8
    if start + size > len(raw):
        raise ValueError(f"image data truncated ({len(raw) - start} of {size} bytes)")
    return ImageFields(stamp, frame_id, height, width, encoding, is_bigendian, step,
                       memoryview(raw)[start:start + size])


class CompressedImageFields(NamedTuple):
    stamp_ns: int
    frame_id: str
    format: str
    data: memoryview  # the compressed bytes, a view into the message


def compressed_image(raw) -> CompressedImageFields:
    """sensor_msgs/msg/CompressedImage."""
    le = _little(raw)
    stamp, frame_id, pos = _header(raw, le)
    fmt, pos = _string(raw, pos, le)
    pos = _align(pos, 4)
    (size,) = _U32[le].unpack_from(raw, pos)
    start = pos + 4
    if start + size > len(raw):
        raise ValueError(f"compressed image data truncated ({len(raw) - start} of {size} bytes)")
    return CompressedImageFields(stamp, frame_id, fmt, memoryview(raw)[start:start + size])


def twist_stamped(raw) -> tuple[int, str, tuple[float, ...]]:
    """geometry_msgs/msg/TwistStamped: (stamp [ns], frame_id, (vx, vy, vz, wx, wy, wz))."""
    le = _little(raw)
    stamp, frame_id, pos = _header(raw, le)
    return stamp, frame_id, _SIX_DOUBLES[le].unpack_from(raw, _align(pos, 8))


def float64(raw) -> float:
    """std_msgs/msg/Float64."""
    return _DOUBLE[_little(raw)].unpack_from(raw, 4)[0]


def _string(raw, pos: int, le: bool) -> tuple[str, int]:
    """A CDR string at pos (aligned here): (text, offset after it)."""
    pos = _align(pos, 4)
    (n,) = _U32[le].unpack_from(raw, pos)
    return bytes(raw[pos + 4:pos + 4 + n]).rstrip(b"\0").decode("utf-8", "replace"), pos + 4 + n


def tf_message(raw) -> list[tuple[int, str, str, tuple[float, ...]]]:
    """tf2_msgs/msg/TFMessage: [(stamp [ns], parent frame, child frame, (x, y, z, qx, qy, qz, qw)), ...]."""
    le = _little(raw)
    (count,) = _U32[le].unpack_from(raw, 4)
    pos, out = 8, []
    stamp_struct, values_struct = _STAMP[le], _SEVEN_DOUBLES[le]
    for _ in range(count):
        pos = _align(pos, 4)
        sec, nanosec = stamp_struct.unpack_from(raw, pos)
        parent, pos = _string(raw, pos + 8, le)
        child, pos = _string(raw, pos, le)
        pos = _align(pos, 8)
        out.append((sec * 1_000_000_000 + nanosec, parent, child, values_struct.unpack_from(raw, pos)))
        pos += 56
    return out


_JOINT_NAMES: list[tuple[bytes, tuple[str, ...]]] = []  # (CDR bytes of a name list, the names), newest first


def joint_state(raw) -> tuple[int, tuple[str, ...], np.ndarray]:
    """sensor_msgs/msg/JointState: (stamp [ns], names, positions (float64, a copy))."""
    le = _little(raw)
    stamp, _, pos = _header(raw, le)
    pos = _align(pos, 4)
    for block, cached in _JOINT_NAMES:  # publishers send the same names every time: compare bytes, skip decoding
        if raw[pos:pos + len(block)] == block:
            names, pos = cached, pos + len(block)
            break
    else:
        start = pos
        (count,) = _U32[le].unpack_from(raw, pos)
        pos += 4
        names = []
        for _ in range(count):
            name, pos = _string(raw, pos, le)
            names.append(name)
        names = tuple(names)
        _JOINT_NAMES.insert(0, (bytes(raw[start:pos]), names))  # it always starts 4-aligned, so it can be reused
        del _JOINT_NAMES[8:]
    pos = _align(pos, 4)
    (n,) = _U32[le].unpack_from(raw, pos)
    pos = _align(pos + 4, 8)
    if pos + 8 * n > len(raw):
        raise ValueError("joint positions truncated")
    positions = np.frombuffer(raw, dtype="<f8" if le else ">f8", count=n, offset=pos).astype(np.float64)
    return stamp, names, positions
