"""Round trips through the whole data path: simulator -> bag -> ingest -> dataset, compared
numerically with what the simulator rendered and what the controller commanded.

1. in-process generator -> bag (MCAP and sqlite3) -> dataset: exact frames and actions;
2. ROS: lapa_sim_arm + lapa_recorder processes, a teleop over DDS -> bag -> dataset: every stored
   frame is an image that went over the wire, and each action is the integral of the twists the
   teleop sent (computed here independently, by fine sampling of Servo's hold-and-timeout rule).
"""

from __future__ import annotations

import hashlib
import threading

import numpy as np
import pytest
import transforms3d
from sensor_msgs.msg import Image

from conftest import NodeProcess, wait_for
from lapa_training.data.dataset import Dataset
from lapa_training.data.ingest import IngestOptions, ingest

PERIOD = 0.1


@pytest.fixture(scope="module")
def env():
    from lapa_sim.env import TabletopEnv

    e = TabletopEnv(image_size=(64, 64))
    yield e
    e.close()


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_generated_bag_ingests_to_exactly_the_frames_and_actions_the_sim_produced(tmp_path, env, storage):
    from lapa_training.data.generate import generate_episode

    ep = generate_episode(env, tmp_path / "bags", "push", 11, storage=storage, keep_arrays=True)
    report = ingest([tmp_path / "bags"], tmp_path / "ds", IngestOptions(image_size=64, progress=False))
    assert report.episodes_added == 1
    ds = Dataset(tmp_path / "ds")
    (record,) = ds.episodes
    assert record["instruction"] == ep.instruction and record["has_actions"] and record["success"] == ep.success
    assert record["task"] == "push"
    np.testing.assert_array_equal(np.asarray(ds.frames), ep.frames)  # bit-identical, nothing lost or added
    actions = np.asarray(ds.actions)
    assert actions.shape == (ep.steps + 1, 7) and np.all(np.isnan(actions[-1]))  # no step after the last frame
    np.testing.assert_allclose(actions[:-1, :3], ep.twists[:, :3] * PERIOD, atol=1e-9)
    expected_rpy = [transforms3d.euler.mat2euler(transforms3d.axangles.axangle2mat(w, np.linalg.norm(w) * PERIOD)
                                                 if np.linalg.norm(w) > 0 else np.eye(3), "sxyz")
                    for w in ep.twists[:, 3:]]
    np.testing.assert_allclose(actions[:-1, 3:6], expected_rpy, atol=1e-9)
    np.testing.assert_allclose(actions[:-1, 6], 1.0 - ep.grippers, atol=1e-9)  # closure = 1 - opening


def test_action_free_generation_gives_an_action_free_episode(tmp_path, env):
    from lapa_training.data.generate import generate_episode

    # a seed as large as evaluation layouts use: header stamps must still fit ROS time's int32 seconds
    generate_episode(env, tmp_path / "bags", "reach", 900_002, record_actions=False)
    ingest([tmp_path / "bags"], tmp_path / "ds", IngestOptions(image_size=32, progress=False))
    ds = Dataset(tmp_path / "ds")
    assert not ds.episodes[0]["has_actions"] and np.all(np.isnan(ds.actions))
    assert ds.frames.shape[1:] == (32, 32, 3) and len(ds.pairs("train")) > 0  # still usable for LAQ


def _integrate(sent: list[tuple[int, np.ndarray, float | None]], t0_ns: int, t1_ns: int,
               stale_ns: int = 250_000_000, dt_ns: int = 100_000) -> np.ndarray:
    """∫ v dt over [t0, t1) for twists held until the next command, zero once older than stale_ns."""
    stamps = np.array([s for s, _, _ in sent])
    v = np.array([tw for _, tw, _ in sent])
    total = np.zeros(6)
    for t in range(t0_ns, t1_ns, dt_ns):
        i = np.searchsorted(stamps, t, side="right") - 1
        if i >= 0 and t - stamps[i] < stale_ns:
            total += v[i] * dt_ns * 1e-9
    return total


def test_ros_recorded_episode_ingests_to_the_images_and_commands_that_went_over_dds(tmp_path, ros, test_node):
    from test_recorder import spinning_teleop

    received: dict[str, list[int]] = {}  # image digest -> stamps (a still scene repeats an image)
    count = [0]
    lock = threading.Lock()

    def on_image(msg):
        digest = hashlib.sha1(bytes(msg.data)).hexdigest()
        with lock:
            received.setdefault(digest, []).append(msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec)
            count[0] += 1

    from rclpy.qos import qos_profile_sensor_data

    test_node.create_subscription(Image, "/camera/image_raw", on_image, qos_profile_sensor_data)
    sim = NodeProcess("lapa_policy_node.sim_arm_node", {"image_width": 48, "image_height": 48, "camera_rate": 10.0})
    rec = NodeProcess("lapa_policy_node.recorder_node", {"output_dir": str(tmp_path / "bags")},
                      extra=["-r", "__node:=lapa_recorder_roundtrip"])
    try:
        with spinning_teleop("/lapa_recorder_roundtrip") as teleop:
            teleop.wait_ready(timeout=60)
            wait_for(lambda: count[0] > 3, 20, what="camera images at the test")
            ep = teleop.run_episode("reach", 8)
            sent = [c for c in teleop.sent]
    finally:
        assert rec.stop() == 0, rec.output()
        assert sim.stop() == 0, sim.output()
    assert ep.success

    report = ingest([tmp_path / "bags"], tmp_path / "ds", IngestOptions(image_size=0, progress=False))
    assert report.episodes_added == 1
    ds = Dataset(tmp_path / "ds")
    frames, actions = np.asarray(ds.frames), np.asarray(ds.actions)
    assert ds.episodes[0]["instruction"] == ep.instruction and ds.episodes[0]["has_actions"]

    # every stored frame is exactly an image the sim published, at the right time on the 10 Hz grid
    t_first = ds.episodes[0]["provenance"]["start_time_ns"]
    for k, frame in enumerate(frames):
        stamps = received.get(hashlib.sha1(frame.tobytes()).hexdigest())
        assert stamps, f"frame {k} is not an image that was published"
        grid = t_first + int(round(k * PERIOD * 1e9))
        assert any(grid - 0.15e9 <= s <= grid + 1e6 for s in stamps), (k, [(s - grid) / 1e9 for s in stamps])

    # every action is the integral of what the teleop commanded over its step
    sent = sorted(sent, key=lambda c: c[0])  # zero twists too: they end the hold
    for k in range(len(actions) - 1):
        t0 = t_first + int(round(k * PERIOD * 1e9))
        expected = _integrate(sent, t0, t0 + int(round(PERIOD * 1e9)))
        np.testing.assert_allclose(actions[k, :3], expected[:3], atol=3e-4, err_msg=f"step {k}")
    moved = np.nansum(actions[:, :3], axis=0)
    assert np.linalg.norm(moved) > 0.05  # the reach moved the TCP: the comparison above was not all zeros


def test_parallel_generation_writes_the_same_episodes_as_one_process(tmp_path):
    from lapa_training.data.generate import generate

    for workers in (1, 2):
        done = generate(tmp_path / f"bags{workers}", ["reach", "push"], 2, image_size=32, first_seed=7,
                        progress=False, workers=workers)
        assert [(e.task, e.seed) for e in done] == [("reach", 7), ("reach", 8), ("push", 7), ("push", 8)]
        ingest([tmp_path / f"bags{workers}"], tmp_path / f"ds{workers}", IngestOptions(image_size=32, progress=False))
    one, two = Dataset(tmp_path / "ds1"), Dataset(tmp_path / "ds2")
    np.testing.assert_array_equal(np.asarray(one.frames), np.asarray(two.frames))
    np.testing.assert_array_equal(np.asarray(one.actions), np.asarray(two.actions))
    assert [e["instruction"] for e in one.episodes] == [e["instruction"] for e in two.episodes]
