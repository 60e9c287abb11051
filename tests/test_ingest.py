"""Ingest: real rosbag2 bags (MCAP and sqlite3, written with rosbags like `ros2 bag record` does),
real video files, real datasets on disk. Nothing of the reader is mocked.

Bags here stamp messages t_k = T0 + k * 0.1 s and receive them 3 ms later, so any use of receive
time where header stamps are meant shows up as wrong frames or actions.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from rosbags.rosbag2 import StoragePlugin, Writer
from transforms3d.axangles import axangle2mat
from transforms3d.euler import euler2mat, mat2euler
from transforms3d.quaternions import mat2quat

from lapa_cli.main import main as lapa_main
from lapa_training.data import bag_format, cdr
from lapa_training.data.bag_format import typestore
from lapa_training.data.bag_reader import BagOptions
from lapa_training.data.dataset import Dataset, assign_splits
from lapa_training.data.images import fit_square, raw_image_to_rgb
from lapa_training.data.ingest import IngestError, IngestOptions, ingest

T0 = 1_700_000_000 * 10**9
STEP = 100_000_000  # 0.1 s
LATENCY = 3_000_000  # receive time = stamp + 3 ms
TS = typestore()
M = TS.types


# ---------------------------------------------------------------- messages and bags
def header(t_ns: int, frame: str = ""):
    return M["std_msgs/msg/Header"](stamp=M["builtin_interfaces/msg/Time"](sec=t_ns // 10**9, nanosec=t_ns % 10**9),
                                    frame_id=frame)


def image_msg(t_ns: int, pixels: np.ndarray, encoding: str = "rgb8", step: int | None = None, bigendian: int = 0):
    h, w = pixels.shape[:2]
    row = pixels.reshape(h, -1).view(np.uint8) if pixels.dtype != np.uint8 else pixels.reshape(h, -1)
    step = step or row.shape[1]
    data = np.zeros((h, step), np.uint8)
    data[:, :row.shape[1]] = row
    return M["sensor_msgs/msg/Image"](header=header(t_ns, "camera"), height=h, width=w, encoding=encoding,
                                      is_bigendian=bigendian, step=step, data=data.reshape(-1))


def compressed_msg(t_ns: int, rgb: np.ndarray, fmt: str):
    ok, buf = cv2.imencode(f".{fmt}", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return M["sensor_msgs/msg/CompressedImage"](header=header(t_ns, "camera"), format=fmt, data=buf.reshape(-1))


def twist_msg(t_ns: int, v, frame: str = bag_format.BASE_FRAME):
    vec = M["geometry_msgs/msg/Vector3"]
    return M["geometry_msgs/msg/TwistStamped"](header=header(t_ns, frame), twist=M["geometry_msgs/msg/Twist"](
        linear=vec(x=float(v[0]), y=float(v[1]), z=float(v[2])),
        angular=vec(x=float(v[3]), y=float(v[4]), z=float(v[5]))))


def pose_msg(t_ns: int, pos, quat_wxyz, frame: str = bag_format.BASE_FRAME):
    return M["geometry_msgs/msg/PoseStamped"](header=header(t_ns, frame), pose=M["geometry_msgs/msg/Pose"](
        position=M["geometry_msgs/msg/Point"](x=float(pos[0]), y=float(pos[1]), z=float(pos[2])),
        orientation=M["geometry_msgs/msg/Quaternion"](w=float(quat_wxyz[0]), x=float(quat_wxyz[1]),
                                                      y=float(quat_wxyz[2]), z=float(quat_wxyz[3]))))


def float64(x: float):
    return M["std_msgs/msg/Float64"](data=float(x))


def string(text: str):
    return M["std_msgs/msg/String"](data=text)


def write_bag(path: Path, messages: list[tuple[str, int, object]], storage: str = "mcap",
              custom: dict[str, str] | None = None) -> Path:
    """A rosbag2 bag like `ros2 bag record` writes: messages = (topic, receive time [ns], message)."""
    plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
    with Writer(path, version=9, storage_plugin=plugin) as w:
        for key, value in (custom or {}).items():
            w.set_custom_data(key, value)
        conns = {}
        for topic, t_ns, msg in sorted(messages, key=lambda m: m[1]):
            typename = msg.__msgtype__
            if topic not in conns:
                conns[topic] = w.add_connection(topic, typename, typestore=TS)
            w.write(conns[topic], t_ns, TS.serialize_cdr(msg, typename))
    return path


def robot_episode(n: int = 12, size: int = 16, seed: int = 0, twists: bool = True, gripper: bool = True,
                  instruction: str | None = "pick up the red block"):
    """Messages of an episode like lapa data generate writes, plus what ingest must produce from them."""
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    v = rng.normal(size=(n - 1, 6)) * np.array([0.1, 0.1, 0.1, 0.5, 0.5, 0.5])
    opening = rng.uniform(0, 1, n - 1)
    msgs = []
    if instruction is not None:
        msgs.append((bag_format.INSTRUCTION_TOPIC, T0 - 5 * STEP, string(instruction)))
    for k in range(n):
        t = T0 + k * STEP
        msgs.append((bag_format.IMAGE_TOPIC, t + LATENCY, image_msg(t, frames[k])))
        if k < n - 1:
            if twists:
                msgs.append((bag_format.TWIST_TOPIC, t + LATENCY, twist_msg(t, v[k])))
            if gripper:
                msgs.append((bag_format.GRIPPER_TOPIC, t + LATENCY, float64(opening[k])))
    return msgs, frames, v, opening


def expected_rotation(w_step: np.ndarray) -> np.ndarray:
    angle = np.linalg.norm(w_step)
    return np.array(mat2euler(axangle2mat(w_step / angle, angle), "sxyz"))


def quiet(**kw) -> IngestOptions:
    kw.setdefault("progress", False)
    kw.setdefault("warn", lambda message: None)
    return IngestOptions(**kw)


# ---------------------------------------------------------------- CDR readers
@pytest.mark.parametrize("little", [True, False])
def test_cdr_readers_match_typestore(little):
    pixels = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)
    img = image_msg(T0 + 123, pixels, step=24)
    raw = bytes(TS.serialize_cdr(img, "sensor_msgs/msg/Image", little_endian=little))
    f = cdr.image(raw)
    assert (f.stamp_ns, f.frame_id, f.height, f.width, f.encoding, f.step) == (T0 + 123, "camera", 5, 7, "rgb8", 24)
    assert bytes(f.data) == bytes(img.data)
    assert cdr.header_stamp_ns(raw) == T0 + 123
    jpeg = compressed_msg(T0 + 7, pixels, "jpg")
    c = cdr.compressed_image(bytes(TS.serialize_cdr(jpeg, jpeg.__msgtype__, little_endian=little)))
    assert (c.stamp_ns, c.frame_id, c.format, bytes(c.data)) == (T0 + 7, "camera", "jpg", bytes(jpeg.data))
    tw = twist_msg(T0 + 5, [0.1, -0.2, 0.3, -0.4, 0.5, -0.6], frame="a_frame_of_odd_length")
    stamp, frame, values = cdr.twist_stamped(bytes(TS.serialize_cdr(tw, tw.__msgtype__, little_endian=little)))
    assert (stamp, frame) == (T0 + 5, "a_frame_of_odd_length")
    assert values == (0.1, -0.2, 0.3, -0.4, 0.5, -0.6)
    assert cdr.float64(bytes(TS.serialize_cdr(float64(0.625), "std_msgs/msg/Float64", little_endian=little))) == 0.625
    vec, quat = M["geometry_msgs/msg/Vector3"], M["geometry_msgs/msg/Quaternion"]
    tfs = M["tf2_msgs/msg/TFMessage"](transforms=[M["geometry_msgs/msg/TransformStamped"](
        header=header(T0 + i, parent), child_frame_id=child, transform=M["geometry_msgs/msg/Transform"](
            translation=vec(x=0.5 * i, y=-1.0, z=2.0), rotation=quat(x=0.1, y=0.2, z=0.3, w=0.9)))
        for i, (parent, child) in enumerate([("base", "link_one"), ("link_one", "a_b"), ("odd", "tool0_")])])
    got = cdr.tf_message(bytes(TS.serialize_cdr(tfs, "tf2_msgs/msg/TFMessage", little_endian=little)))
    assert got == [(T0 + i, parent, child, (0.5 * i, -1.0, 2.0, 0.1, 0.2, 0.3, 0.9))
                   for i, (parent, child) in enumerate([("base", "link_one"), ("link_one", "a_b"), ("odd", "tool0_")])]
    js = M["sensor_msgs/msg/JointState"](header=header(T0 + 9, "x"), name=["j1", "joint_22", "j333"],
                                         position=np.array([0.1, -0.2, 0.3]), velocity=np.zeros(0),
                                         effort=np.ones(3))
    for frame in ("x", "longer_frame", "x"):  # the second "x" reads its names from the cache
        js.header.frame_id = frame
        stamp, names, positions = cdr.joint_state(bytes(TS.serialize_cdr(js, "sensor_msgs/msg/JointState",
                                                                          little_endian=little)))
        assert (stamp, names, positions.tolist()) == (T0 + 9, ("j1", "joint_22", "j333"), [0.1, -0.2, 0.3])
    js.name = ["j1", "joint_23", "j333"]
    assert cdr.joint_state(bytes(TS.serialize_cdr(js, "sensor_msgs/msg/JointState", little_endian=little)))[1] == \
        ("j1", "joint_23", "j333")


# ---------------------------------------------------------------- round trips
@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_twist_bag_round_trip(tmp_path, storage):
    msgs, frames, v, opening = robot_episode(n=15, size=16)
    bag = write_bag(tmp_path / "ep_000", msgs, storage)
    report = ingest([bag], tmp_path / "ds", quiet(image_size=16))
    assert report.episodes_added == 1 and report.frames_added == 15
    ds = Dataset(tmp_path / "ds")
    assert ds.frames.shape == (15, 16, 16, 3)
    assert np.array_equal(np.asarray(ds.frames), frames)  # bit-identical at native size
    a = np.asarray(ds.actions, dtype=np.float64)
    assert np.allclose(a[:-1, :3], v[:, :3] * 0.1, atol=1e-6, rtol=0)
    for k in range(14):
        assert np.allclose(a[k, 3:6], expected_rotation(v[k, 3:] * 0.1), atol=1e-6, rtol=0)
    assert np.allclose(a[:-1, 6], 1.0 - opening, atol=1e-6)  # defaults: opening 1 = open -> closure 0
    assert np.isnan(a[-1]).all()  # the last frame has no next step
    assert np.allclose(ds.timestamps, np.arange(15) * 0.1)
    ep = ds.episodes[0]
    assert ep["instruction"] == "pick up the red block" and ep["has_actions"] and ep["split"] == "train"
    assert ep["fps"] == 10.0 and ep["window_frames"] == 6 and ep["length"] == 15
    prov = ep["provenance"]
    assert prov["storage"] == storage and prov["encoding"] == "rgb8" and prov["action_source"] == "twist"
    assert prov["topics"]["twist"] == bag_format.TWIST_TOPIC and prov["start_time_ns"] == T0


def test_pose_bag_round_trip(tmp_path):
    """EE poses only, stamped half-way between frames: interpolation (linear + slerp) must recover the motion."""
    n = 10
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    p0, vel = np.array([0.4, 0.0, 0.3]), np.array([0.05, -0.02, 0.01])  # m/s
    axis, rate = np.array([0.3, -0.5, 0.8]) / np.linalg.norm([0.3, -0.5, 0.8]), 0.4  # rad/s about a fixed axis
    r0 = euler2mat(0.1, 0.2, 0.3, "sxyz")

    def pose_at(t_s):
        return p0 + vel * t_s, axangle2mat(axis, rate * t_s) @ r0

    msgs = [(bag_format.INSTRUCTION_TOPIC, T0, string("wipe"))]
    for k in range(n):
        msgs.append((bag_format.IMAGE_TOPIC, T0 + k * STEP + LATENCY, image_msg(T0 + k * STEP, frames[k])))
    for j in range(-1, n + 1):  # poses at t_k - 0.05 s
        t_s = j * 0.1 - 0.05
        pos, rot = pose_at(t_s)
        msgs.append((bag_format.EE_POSE_TOPIC, T0 + int(round(t_s * 1e9)) + LATENCY,
                     pose_msg(T0 + int(round(t_s * 1e9)), pos, mat2quat(rot))))
    bag = write_bag(tmp_path / "poses", msgs)
    ingest([bag], tmp_path / "ds", quiet(image_size=8))
    ds = Dataset(tmp_path / "ds")
    a = np.asarray(ds.actions, dtype=np.float64)
    assert ds.episodes[0]["provenance"]["action_source"] == "pose" and ds.episodes[0]["has_actions"]
    assert np.allclose(a[:-1, :3], vel * 0.1, atol=1e-9)
    delta = np.array(mat2euler(axangle2mat(axis, rate * 0.1), "sxyz"))
    assert np.allclose(a[:-1, 3:6], delta, atol=1e-6)
    assert np.isnan(a[:, 6]).all()  # no gripper topic: gripper unknown

    ingest([bag], tmp_path / "none", quiet(image_size=8, bag=BagOptions(actions="none")))
    assert not Dataset(tmp_path / "none").episodes[0]["has_actions"]
    with pytest.raises(IngestError, match="actions from twists requested but there are no twist messages"):
        ingest([bag], tmp_path / "twist", quiet(image_size=8, bag=BagOptions(actions="twist")))


def test_twists_held_until_stale(tmp_path):
    """MoveIt Servo semantics: a command holds until the next one, and at most 0.25 s."""
    n = 8
    msgs = [(bag_format.INSTRUCTION_TOPIC, T0, string("move"))]
    for k in range(n):
        msgs.append((bag_format.IMAGE_TOPIC, T0 + k * STEP, image_msg(T0 + k * STEP, np.zeros((4, 4, 3), np.uint8))))
    v = np.array([0.2, 0, 0, 0, 0, 0.5])
    msgs.append((bag_format.TWIST_TOPIC, T0, twist_msg(T0, v)))  # held 0.25 s, then stale
    msgs.append((bag_format.TWIST_TOPIC, T0 + 5 * STEP + STEP // 2, twist_msg(T0 + 5 * STEP + STEP // 2, -v)))
    ingest([write_bag(tmp_path / "b", msgs)], tmp_path / "ds", quiet(image_size=4))
    a = np.asarray(Dataset(tmp_path / "ds").actions, dtype=np.float64)
    assert np.allclose(a[:7, 0], [0.02, 0.02, 0.01, 0, 0, -0.01, -0.02], atol=1e-9)
    assert np.allclose(a[:7, 5], [0.05, 0.05, 0.025, 0, 0, -0.025, -0.05], atol=1e-9)


def test_gripper_command_in_force_at_step_end(tmp_path):
    """Float64 has no header: receive times count. Step k takes the last command before t_{k+1}."""
    n = 6
    msgs = [(bag_format.INSTRUCTION_TOPIC, T0, string("grip"))]
    for k in range(n):
        msgs.append((bag_format.IMAGE_TOPIC, T0 + k * STEP, image_msg(T0 + k * STEP, np.zeros((4, 4, 3), np.uint8))))
        msgs.append((bag_format.TWIST_TOPIC, T0 + k * STEP, twist_msg(T0 + k * STEP, np.zeros(6))))
    # Franka-like width command: 0.08 m open, 0 closed; commands exactly on t_2, t_3 and mid-step 4
    for t, width in [(T0 + 2 * STEP, 0.08), (T0 + 3 * STEP, 0.02), (T0 + 4 * STEP + STEP // 2, 0.0)]:
        msgs.append((bag_format.GRIPPER_TOPIC, t, float64(width)))
    bag = write_bag(tmp_path / "b", msgs)
    ingest([bag], tmp_path / "ds", quiet(image_size=4, bag=BagOptions(gripper_open=0.08, gripper_closed=0.0)))
    grip = np.asarray(Dataset(tmp_path / "ds").actions[:, 6], dtype=np.float64)
    assert np.isnan(grip[:2]).all() and np.isnan(grip[-1])
    assert np.allclose(grip[2:5], [0.0, 0.75, 1.0])


def test_tcp_frame_twists_are_rotated_to_base(tmp_path):
    n = 5
    rot = euler2mat(0.0, 0.0, np.pi / 2, "sxyz")  # TCP x axis = base y axis
    msgs = [(bag_format.INSTRUCTION_TOPIC, T0, string("slide"))]
    for k in range(n):
        t = T0 + k * STEP
        msgs.append((bag_format.IMAGE_TOPIC, t, image_msg(t, np.zeros((4, 4, 3), np.uint8))))
        msgs.append((bag_format.EE_POSE_TOPIC, t, pose_msg(t, [0.4, 0, 0.3], mat2quat(rot))))
        msgs.append((bag_format.TWIST_TOPIC, t, twist_msg(t, [0.1, 0, 0, 0, 0, 0], frame="panda_hand_tcp")))
    ingest([write_bag(tmp_path / "b", msgs)], tmp_path / "ds", quiet(image_size=4))
    a = np.asarray(Dataset(tmp_path / "ds").actions, dtype=np.float64)
    assert np.allclose(a[:-1, :3], [0.0, 0.01, 0.0], atol=1e-9)

    msgs = [m for m in msgs if m[0] != bag_format.TWIST_TOPIC]
    msgs.append((bag_format.TWIST_TOPIC, T0, twist_msg(T0, [0.1, 0, 0, 0, 0, 0], frame="camera_link")))
    with pytest.raises(IngestError, match="camera_link"):
        ingest([write_bag(tmp_path / "c", msgs)], tmp_path / "ds2", quiet(image_size=4))


def test_camera_faster_than_control_rate_with_jitter(tmp_path):
    """30 Hz camera with jittered, partly out-of-order stamps: frame k is the newest image stamped <= t_k."""
    rng = np.random.default_rng(2)
    n_img = 31
    stamps = T0 + np.arange(n_img) * (STEP // 3) + rng.integers(-200_000, 200_000, n_img)
    stamps[0] = T0
    msgs = [(bag_format.INSTRUCTION_TOPIC, T0, string("look"))]
    for j in range(n_img):
        recv = int(stamps[j]) + LATENCY + (15_000_000 if j == 7 else 0)  # image 7 arrives after image 8
        msgs.append((bag_format.IMAGE_TOPIC, recv, image_msg(int(stamps[j]), np.full((4, 4, 3), j, np.uint8))))
    ingest([write_bag(tmp_path / "b", msgs)], tmp_path / "ds", quiet(image_size=4))
    ds = Dataset(tmp_path / "ds")
    grid = T0 + np.arange(len(ds)) * STEP
    expected = [int(np.flatnonzero(stamps <= t + 1_000_000).max()) for t in grid]
    assert len(ds) == (stamps.max() - T0) // STEP + 1  # t_k <= last image stamp
    assert [int(f[0, 0, 0]) for f in np.asarray(ds.frames)] == expected
    assert not ds.episodes[0]["has_actions"]


def test_images_out_of_stamp_order_are_put_back_and_one_past_the_window_is_dropped(tmp_path):
    """Image 3 arrives just after image 4 (put back in place); image 9 arrives after the reorder window
    has passed it on (dropped and counted: the frame before stands in for it)."""
    from lapa_training.data.bag_reader import REORDER_WINDOW

    n = REORDER_WINDOW + 20
    late = {3: T0 + 4 * STEP + 1_000_000, 9: T0 + (9 + REORDER_WINDOW + 2) * STEP}
    msgs = [(bag_format.INSTRUCTION_TOPIC, T0, string("wait"))]
    for k in range(n):
        stamp = T0 + k * STEP
        msgs.append((bag_format.IMAGE_TOPIC, late.get(k, stamp), image_msg(stamp, np.full((4, 4, 3), k, np.uint8))))
    warnings: list[str] = []
    ingest([write_bag(tmp_path / "shuffled", msgs)], tmp_path / "ds", quiet(image_size=4, warn=warnings.append))
    ds = Dataset(tmp_path / "ds")
    assert [int(f[0, 0, 0]) for f in np.asarray(ds.frames)] == [8 if k == 9 else k for k in range(n)]
    assert ds.episodes[0]["provenance"]["late_images_dropped"] == 1
    assert any("shuffled" in w and "1 images arrived more than" in w for w in warnings), warnings


def test_image_gaps_are_reported_and_bridged(tmp_path):
    msgs = [(bag_format.INSTRUCTION_TOPIC, T0, string("wait"))]
    for k in (0, 1, 2, 8, 9):  # camera dropped out for 0.6 s
        msgs.append((bag_format.IMAGE_TOPIC, T0 + k * STEP, image_msg(T0 + k * STEP, np.full((4, 4, 3), k, np.uint8))))
    warnings: list[str] = []
    ingest([write_bag(tmp_path / "gappy", msgs)], tmp_path / "ds", quiet(image_size=4, warn=warnings.append))
    ds = Dataset(tmp_path / "ds")
    assert [int(f[0, 0, 0]) for f in np.asarray(ds.frames)] == [0, 1, 2, 2, 2, 2, 2, 2, 8, 9]
    assert ds.episodes[0]["provenance"]["image_gaps"] == [{"at_s": 0.2, "length_s": 0.6}]
    assert any("gappy" in w and "1 gap(s) between images" in w for w in warnings)


# ---------------------------------------------------------------- images
def test_raw_encodings():
    rgb = np.random.default_rng(3).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    padded = np.zeros((5, 6 * 3 + 5), np.uint8)
    padded[:, :18] = bgr.reshape(5, 18)
    assert np.array_equal(raw_image_to_rgb(5, 6, "bgr8", 0, 23, padded.reshape(-1)), rgb)
    rgba = np.concatenate([rgb, np.full((5, 6, 1), 7, np.uint8)], axis=2)
    assert np.array_equal(raw_image_to_rgb(5, 6, "rgba8", 0, 24, rgba.reshape(-1)), rgb)
    gray = rgb[:, :, 0]
    assert np.array_equal(raw_image_to_rgb(5, 6, "mono8", 0, 6, gray.reshape(-1)), np.repeat(gray[:, :, None], 3, 2))
    mono16 = gray.astype(np.uint16) * 256 + 99
    out = raw_image_to_rgb(5, 6, "mono16", 1, 12, mono16.astype(">u2").view(np.uint8).reshape(-1))
    assert np.array_equal(out[:, :, 1], gray)
    with pytest.raises(IngestError, match="unknown image encoding 'bayer_rggb8'"):
        raw_image_to_rgb(5, 6, "bayer_rggb8", 0, 6, gray.reshape(-1))


@pytest.mark.parametrize("encoding", ["bgr8", "mono8"])
def test_bag_with_other_encodings(tmp_path, encoding):
    rng = np.random.default_rng(4)
    rgb = rng.integers(0, 256, (3, 6, 5, 3), dtype=np.uint8)
    if encoding == "mono8":
        rgb[..., 1] = rgb[..., 2] = rgb[..., 0]
    msgs = [(bag_format.INSTRUCTION_TOPIC, T0, string("look"))]
    for k in range(3):
        pixels = rgb[k, :, :, ::-1] if encoding == "bgr8" else rgb[k, :, :, 0]
        msgs.append(("/cam/image", T0 + k * STEP, image_msg(T0 + k * STEP, np.ascontiguousarray(pixels), encoding,
                                                             step=pixels[0].size + 3)))
    ingest([write_bag(tmp_path / "b", msgs)], tmp_path / "ds", quiet(image_size=0))
    ds = Dataset(tmp_path / "ds")
    assert np.array_equal(np.asarray(ds.frames), rgb)
    assert ds.episodes[0]["provenance"]["encoding"] == encoding
    assert ds.episodes[0]["provenance"]["topics"]["image"] == "/cam/image"  # the bag's only image topic


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_compressed_images(tmp_path, fmt):
    yy, xx = np.mgrid[0:24, 0:24]
    rgb = np.stack([xx * 10, yy * 10, np.full_like(xx, 128)], axis=2).astype(np.uint8)
    msgs = [(bag_format.INSTRUCTION_TOPIC, T0, string("look")),
            ("/camera/image_raw/compressed", T0, compressed_msg(T0, rgb, "png" if fmt == "png" else "jpg"))]
    ingest([write_bag(tmp_path / "b", msgs)], tmp_path / "ds", quiet(image_size=24))
    frame = np.asarray(Dataset(tmp_path / "ds").frames[0]).astype(int)
    if fmt == "png":
        assert np.array_equal(frame, rgb)
    else:
        assert np.abs(frame - rgb).mean() < 4 and abs(frame[..., 0].mean() - rgb[..., 0].mean()) < 2


def test_resize_is_center_crop_then_area():
    img = np.random.default_rng(5).integers(0, 256, (60, 90, 3), dtype=np.uint8)
    expected = cv2.resize(np.ascontiguousarray(img[:, 15:75]), (20, 20), interpolation=cv2.INTER_AREA)
    assert np.array_equal(fit_square(img, 20), expected)
    assert fit_square(img[:20, :20], 20) is not None and np.array_equal(fit_square(img[:20, :20], 20), img[:20, :20])


# ---------------------------------------------------------------- instructions, action-free
def test_bag_without_action_topics_is_action_free(tmp_path):
    msgs, frames, _, _ = robot_episode(n=6, twists=False, gripper=False)
    ingest([write_bag(tmp_path / "b", msgs)], tmp_path / "ds", quiet(image_size=16))
    ds = Dataset(tmp_path / "ds")
    assert not ds.episodes[0]["has_actions"] and np.isnan(np.asarray(ds.actions)).all()
    assert ds.episodes[0]["provenance"]["action_source"] is None and len(ds.pairs("train", 2)) == 4


def test_instruction_sources_in_order(tmp_path):
    msgs, _, _, _ = robot_episode(n=3, instruction=None)
    topic = [(bag_format.INSTRUCTION_TOPIC, T0, string("from the topic"))]
    custom = {"lapa.instruction": "from the metadata", "lapa.success": "false", "lapa.task": "push"}
    write_bag(tmp_path / "in" / "a_topic", msgs + topic, custom=custom)
    write_bag(tmp_path / "in" / "b_meta", msgs, custom=custom)
    write_bag(tmp_path / "in" / "c_txt", msgs)
    (tmp_path / "in" / "c_txt" / "instruction.txt").write_text("from the side file\n")
    write_bag(tmp_path / "in" / "d_csv", msgs)
    with open(tmp_path / "names.csv", "w", newline="") as f:
        csv.writer(f).writerows([["bag", "instruction"], ["d_csv", "from the csv"], ["c_txt", "not used"]])
    ingest([tmp_path / "in"], tmp_path / "ds", quiet(image_size=16, instructions_file=tmp_path / "names.csv"))
    eps = {e["name"]: e for e in Dataset(tmp_path / "ds").episodes}
    assert eps["a_topic"]["instruction"] == "from the topic"
    assert eps["b_meta"]["instruction"] == "from the metadata"
    assert eps["b_meta"]["success"] is False and eps["b_meta"]["task"] == "push"
    assert eps["c_txt"]["instruction"] == "from the side file"
    assert eps["d_csv"]["instruction"] == "from the csv"
    assert eps["d_csv"]["success"] is None and eps["d_csv"]["task"] is None


def test_episode_json_and_empty_instruction(tmp_path):
    msgs, _, _, _ = robot_episode(n=3, instruction=None)
    bag = write_bag(tmp_path / "ep", msgs)
    with pytest.raises(IngestError, match=r"ep: empty instruction"):
        ingest([bag], tmp_path / "ds", quiet())
    assert not (tmp_path / "ds").exists()
    report = ingest([bag], tmp_path / "ds", quiet(allow_empty_instruction=True))
    assert report.episodes_added == 1 and Dataset(tmp_path / "ds").episodes[0]["instruction"] == ""
    (bag / bag_format.EPISODE_JSON).write_text(json.dumps({"instruction": "stack", "status": "complete"}))
    ingest([bag], tmp_path / "ds", quiet(mode="overwrite"))
    assert Dataset(tmp_path / "ds").episodes[0]["instruction"] == "stack"


# ---------------------------------------------------------------- bad input
def test_bad_bags_are_named(tmp_path):
    msgs, _, _, _ = robot_episode(n=4)
    good = write_bag(tmp_path / "good", msgs)
    truncated = shutil.copytree(good, tmp_path / "truncated")
    mcap = next(truncated.glob("*.mcap"))
    mcap.write_bytes(mcap.read_bytes()[: mcap.stat().st_size // 2])
    with pytest.raises(IngestError, match=r"truncated: corrupt"):
        ingest([truncated], tmp_path / "ds", quiet())

    garbage = write_bag(tmp_path / "garbage", msgs, storage="sqlite3")
    next(garbage.glob("*.db3")).write_bytes(b"this is not a database" * 100)
    with pytest.raises(IngestError, match=r"garbage: corrupt"):
        ingest([garbage], tmp_path / "ds", quiet())

    no_meta = shutil.copytree(good, tmp_path / "no_meta")
    (no_meta / "metadata.yaml").unlink()
    next(no_meta.glob("*.mcap")).rename(no_meta / "no_meta_0.mcap")  # as `ros2 bag record` names it
    with pytest.raises(IngestError, match=r"no_meta: missing metadata.yaml.*ros2 bag reindex"):
        ingest([no_meta], tmp_path / "ds", quiet())

    with pytest.raises(IngestError, match=r"no topic '/nope'.*the bag has: .*/camera/image_raw \(sensor_msgs/Image"):
        ingest([good], tmp_path / "ds", quiet(bag=BagOptions(twist_topic="/nope")))

    two = write_bag(tmp_path / "two_cams", [("/left", T0, image_msg(T0, np.zeros((2, 2, 3), np.uint8))),
                                            ("/right", T0, image_msg(T0, np.zeros((2, 2, 3), np.uint8)))])
    with pytest.raises(IngestError, match=r"several image topics \(/left, /right\)"):
        ingest([two], tmp_path / "ds", quiet())
    assert not (tmp_path / "ds").exists()


def test_skip_bad_and_incomplete(tmp_path):
    root = tmp_path / "bags"
    for i in range(2):
        write_bag(root / f"ep_{i}", robot_episode(n=4, seed=i)[0])
    bad = write_bag(root / "ep_bad", robot_episode(n=4)[0])
    mcap = next(bad.glob("*.mcap"))
    mcap.write_bytes(mcap.read_bytes()[:200])
    write_bag(root / bag_format.STAGING_DIR / "ep_interrupted", robot_episode(n=4)[0])
    recording = write_bag(root / "ep_recording", robot_episode(n=4)[0])
    (recording / bag_format.EPISODE_JSON).write_text(json.dumps({"status": "recording", "instruction": "x"}))

    with pytest.raises(IngestError, match="ep_bad"):
        ingest([root], tmp_path / "ds", quiet())
    assert not (tmp_path / "ds").exists()

    warnings: list[str] = []
    report = ingest([root], tmp_path / "ds", quiet(skip_bad=True, warn=warnings.append))
    assert report.episodes_added == 2 and [Path(p).name for p, _ in report.skipped] == ["ep_bad"]
    assert sorted(Path(p).name for p in report.incomplete) == ["ep_interrupted", "ep_recording"]
    assert any("ep_bad" in w and "skipping" in w for w in warnings)
    assert any("ep_interrupted" in w and "incomplete" in w for w in warnings)
    assert any(w.startswith("skipped 1 bad input") for w in warnings)
    assert [e["name"] for e in Dataset(tmp_path / "ds").episodes] == ["ep_0", "ep_1"]


# ---------------------------------------------------------------- videos
def write_video(path: Path, n: int, fps: float, fourcc: str, size=(32, 24)) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, size)
    assert writer.isOpened(), f"cannot write {path} with {fourcc}"
    for j in range(n):
        writer.write(np.full((size[1], size[0], 3), 4 * j, np.uint8))  # brightness tells the frame index
    writer.release()


def test_video_folder_with_csv_captions(tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    write_video(folder / "pour.mp4", 60, 30.0, "mp4v")
    write_video(folder / "wave.avi", 45, 25.0, "MJPG")
    (folder / "captions.csv").write_text("video,instruction\npour.mp4,pour the water\nwave,wave hello\n")
    ingest([folder], tmp_path / "ds", quiet(image_size=16))  # default window: 2.4 s over 6 frames
    ds = Dataset(tmp_path / "ds")
    eps = {e["name"]: e for e in ds.episodes}
    pour, wave = eps["pour"], eps["wave"]
    assert pour["instruction"] == "pour the water" and wave["instruction"] == "wave hello"
    assert pour["provenance"]["stride"] == 12 and pour["fps"] == pytest.approx(2.5) and pour["length"] == 5
    assert wave["provenance"]["stride"] == 10 and wave["fps"] == pytest.approx(2.5) and wave["length"] == 5
    assert pour["window_frames"] == 6 and not pour["has_actions"]
    assert pour["provenance"]["kind"] == "video" and pour["provenance"]["storage"] == "mp4"
    brightness = np.asarray(ds.frames[ds.episode_slice(pour["index"])]).mean(axis=(1, 2, 3))
    assert np.abs(brightness / 4 - 12 * np.arange(5)).max() < 1.5  # source frames 0, 12, 24, ... (lossy codec)
    assert np.allclose(ds.timestamps[ds.episode_slice(pour["index"])], np.arange(5) * 0.4)
    assert np.isnan(np.asarray(ds.actions)).all()


def test_ssv2_json_and_window(tmp_path):
    folder = tmp_path / "ssv2"
    folder.mkdir()
    write_video(folder / "101.webm", 24, 12.0, "VP80")
    labels = [{"id": "101", "label": "putting a cup on a table", "template": "Putting [something] on [something]",
               "placeholders": ["a cup", "a table"]}]
    (tmp_path / "train.json").write_text(json.dumps(labels))
    ingest([folder], tmp_path / "ds", quiet(image_size=8, window_s=1.0, window_frames=4,
                                            instructions_file=tmp_path / "train.json"))
    ep = Dataset(tmp_path / "ds").episodes[0]
    assert ep["instruction"] == "putting a cup on a table"
    assert ep["provenance"]["stride"] == 3 and ep["fps"] == pytest.approx(4.0) and ep["length"] == 8
    assert ep["window_frames"] == 4


def test_unreadable_video(tmp_path):
    folder = tmp_path / "v"
    folder.mkdir()
    (folder / "broken.mp4").write_bytes(b"\x00\x01 definitely not a video" * 50)
    (folder / "captions.csv").write_text("video,instruction\nbroken.mp4,do something\n")
    with pytest.raises(IngestError, match=r"broken.mp4: unreadable video"):
        ingest([folder], tmp_path / "ds", quiet())


# ---------------------------------------------------------------- dataset: splits, append, merge, pairs
def test_splits_deterministic_and_by_episode(tmp_path):
    assert assign_splits([None], (0.8, 0.1, 0.1), 0) == ["train"]
    ten = assign_splits([None] * 10, (0.8, 0.1, 0.1), 3)
    assert sorted(ten).count("train") == 8 and ten.count("val") == 1 and ten.count("test") == 1
    assert ten == assign_splits([None] * 10, (0.8, 0.1, 0.1), 3)
    assert {tuple(assign_splits([None] * 10, (0.8, 0.1, 0.1), s)) for s in range(8)} != {tuple(ten)}
    kept = assign_splits(["test"] + [None] * 9, (0.8, 0.1, 0.1), 3)
    assert kept[0] == "test" and kept.count("test") == 1 and kept.count("train") == 8

    root = tmp_path / "bags"
    for i in range(10):
        write_bag(root / f"ep_{i:02d}", robot_episode(n=4, size=4, seed=i)[0])
    ingest([root], tmp_path / "a", quiet(image_size=4, seed=7))
    ingest([root], tmp_path / "b", quiet(image_size=4, seed=7))
    a, b = Dataset(tmp_path / "a"), Dataset(tmp_path / "b")
    assert [e["split"] for e in a.episodes] == [e["split"] for e in b.episodes]
    assert a.meta["episodes_per_split"] == {"train": 8, "val": 1, "test": 1}
    for split in ("train", "val", "test"):
        pairs = a.pairs(split, window_frames=2)
        assert (a.episode_index[pairs[:, 0]] == a.episode_index[pairs[:, 1]]).all()
        assert {a.episodes[int(i)]["split"] for i in a.episode_index[pairs[:, 0]]} == {split}
        assert len(pairs) == 2 * a.meta["episodes_per_split"][split]  # 4 frames, H = 2: 2 pairs per episode
        assert (pairs[:, 1] - pairs[:, 0] == 2).all()


def test_append_and_merge(tmp_path):
    write_bag(tmp_path / "one" / "ep_a", robot_episode(n=5, size=8, seed=1)[0])
    write_bag(tmp_path / "two" / "ep_b", robot_episode(n=7, size=8, seed=2)[0])
    ingest([tmp_path / "one"], tmp_path / "ds", quiet(image_size=8))
    with pytest.raises(IngestError, match="--overwrite.*--append"):
        ingest([tmp_path / "two"], tmp_path / "ds", quiet(image_size=8))
    ingest([tmp_path / "two"], tmp_path / "ds", quiet(image_size=8, mode="append"))
    ds = Dataset(tmp_path / "ds")
    assert [e["name"] for e in ds.episodes] == ["ep_a", "ep_b"] and len(ds) == 12
    assert [e["start"] for e in ds.episodes] == [0, 5] and list(ds.episode_index) == [0] * 5 + [1] * 7
    assert len(ds.meta["ingests"]) == 2 and ds.meta["num_frames"] == 12
    with pytest.raises(IngestError, match="holds 8x8 frames"):
        ingest([tmp_path / "two"], tmp_path / "ds", quiet(image_size=16, mode="append"))

    ingest([tmp_path / "ds", tmp_path / "one"], tmp_path / "merged", quiet(image_size=8))
    merged = Dataset(tmp_path / "merged")
    assert [e["name"] for e in merged.episodes] == ["ep_a", "ep_b", "ep_a"]
    assert np.array_equal(np.asarray(merged.frames[:12]), np.asarray(ds.frames))
    assert np.array_equal(np.asarray(merged.actions[:12]), np.asarray(ds.actions), equal_nan=True)
    assert merged.episodes[1]["provenance"]["merged_from"] == str((tmp_path / "ds").resolve())


# ---------------------------------------------------------------- CLI
def test_cli_ingest_and_info(tmp_path, capsys):
    write_bag(tmp_path / "bags" / "ep_0", robot_episode(n=6, size=8, instruction=None)[0],
              custom={"lapa.instruction": "push the red block left", "lapa.task": "push", "lapa.success": "true"})
    write_bag(tmp_path / "bags" / "ep_1", robot_episode(n=4, size=8, twists=False, gripper=False,
                                                        instruction="open the drawer")[0])
    assert lapa_main(["data", "ingest", str(tmp_path / "bags"), "--out", str(tmp_path / "ds"),
                      "--image-size", "8"]) == 0
    assert "ingested 2 episodes (1 with actions), 10 frames" in capsys.readouterr().out
    assert lapa_main(["data", "info", str(tmp_path / "ds")]) == 0
    out = capsys.readouterr().out
    assert "episodes     2  (1 with actions, 1 action-free; success 1/1 known)" in out
    assert "frames       10  (8x8 RGB" in out and "train 2 ep / 10 frames" in out
    assert "tasks        (none) (1 ep), push (1 ep)" in out and "bag/mcap (2 ep)" in out
    assert "instructions 2 (2 distinct)" in out
    assert lapa_main(["data", "info", "--json", str(tmp_path / "ds")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["action_stats"]["dx"]["count"] == 5 and summary["action_stats"]["gripper"]["max"] <= 1


@pytest.mark.parametrize("argv, message", [
    (["data", "ingest", "{tmp}/missing", "--out", "{tmp}/ds"], "missing: no such file or directory"),
    (["data", "ingest", "{tmp}/bags", "--out", "{tmp}/ds", "--twist-topic", "/x"], "no topic '/x'"),
    (["data", "ingest", "{tmp}/bags", "--out", "{tmp}/ds", "--split", "0.8,0.2"], "bad --split"),
    (["data", "ingest", "{tmp}/bags", "--out", "{tmp}/ds", "--rate", "0"], "--rate must be positive"),
    (["data", "ingest", "{tmp}/bags/ep_0/ep_0.mcap", "--out", "{tmp}/ds"], "give the bag directory"),
    (["data", "info", "{tmp}/bags"], "is not a dataset"),
    (["data"], "give an action"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, argv, message):
    write_bag(tmp_path / "bags" / "ep_0", robot_episode(n=3, size=4)[0])
    assert lapa_main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lapa data: error: ") and message in err, err
    assert "Traceback" not in err and not (tmp_path / "ds").exists()


def test_failed_first_source_with_source_size_frames_is_dropped_cleanly(tmp_path):
    """--image-size 0: the writer learns the frame shape from the first frame; a source that fails before
    giving one is undone without error, and the next is ingested."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a_broken.mp4").write_bytes(b"not a video" * 100)
    write_bag(tmp_path / "in" / "b_good", robot_episode(n=3, size=4)[0])
    report = ingest([tmp_path / "in"], tmp_path / "ds", quiet(image_size=0, skip_bad=True))
    assert report.episodes_added == 1 and len(report.skipped) == 1
    assert Dataset(tmp_path / "ds").frames.shape == (3, 4, 4, 3)
