"""lapa_recorder over real DDS: episodes recorded from the simulated arm driven by a scripted teleop,
service errors, crash safety under SIGKILL, and a clean save on SIGTERM."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import yaml
from rosbags.rosbag2 import Reader

from conftest import NodeProcess, run_to_exit, wait_for
from lapa_training.data import bag_format

SIM = "lapa_policy_node.sim_arm_node"
RECORDER = "lapa_policy_node.recorder_node"


@pytest.fixture(scope="module")
def sim(ros):
    proc = NodeProcess(SIM, {"image_width": 64, "image_height": 64, "camera_rate": 10.0, "publish_tf": True})
    yield proc
    assert proc.stop() == 0, proc.output()


def spinning_teleop(recorder_node: str = "/lapa_recorder"):
    """A ScriptedTeleop (the test's client of sim and recorder), spun in a background thread."""
    from lapa_policy_node.runtime import spinning
    from lapa_policy_node.scripted_teleop import ScriptedTeleop

    return spinning(ScriptedTeleop(recorder_node=recorder_node))


@pytest.fixture(scope="module")
def teleop(ros, sim):
    with spinning_teleop() as node:
        yield node


def _recorder(out_dir, name: str = "lapa_recorder", **params) -> NodeProcess:
    # A recorder that dies by SIGKILL stays in the DDS graph for a while: tests that kill one give
    # it a name of its own, so that later clients never wait on a dead server.
    proc = NodeProcess(RECORDER, {"output_dir": str(out_dir), **params}, extra=["-r", f"__node:={name}"])
    wait_for(lambda: "recorder ready" in proc.output() or proc.proc.poll() is not None, 60, what="the recorder")
    assert proc.proc.poll() is None, proc.output()
    return proc


def _read(bag_dir) -> dict[str, int]:
    with Reader(bag_dir) as reader:
        return {c.topic: sum(1 for _ in reader.messages(connections=[c])) for c in reader.connections}


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_teleop_episode_is_recorded_as_a_complete_bag(tmp_path, sim, teleop, storage):
    from diagnostic_msgs.msg import DiagnosticArray

    arrays = []
    sub = teleop.create_subscription(DiagnosticArray, "/diagnostics", arrays.append, 50)
    rec = _recorder(tmp_path, storage=storage)
    # /diagnostics: a status per recorded topic with its rate
    def rate(topic: str) -> float:
        found = [s for a in list(arrays) for s in a.status if s.name == f"lapa_recorder: {topic}"]
        return float({kv.key: kv.value for kv in found[-1].values}["rate_hz"]) if found else 0.0

    try:
        teleop.wait_ready(timeout=60)
        # discovery is not delivery: the episode's first steps need the arm's streams in the bag already
        streams = (bag_format.IMAGE_TOPIC, "/tf", bag_format.JOINT_STATE_TOPIC, bag_format.EE_POSE_TOPIC)
        wait_for(lambda: all(rate(t) > 0 for t in streams), 30, what="the recorder hearing the arm's streams")
        ep = teleop.run_episode("reach", 3)
        assert rate(bag_format.IMAGE_TOPIC) > 3
    finally:
        teleop.destroy_subscription(sub)
        assert rec.stop() == 0, rec.output()
    assert ep.success, "the scripted teleop should solve reach/3 through ROS"
    bag = tmp_path / "reach_000003"
    assert ep.bag_path == str(bag) and bag.is_dir()
    assert not (tmp_path / bag_format.STAGING_DIR).exists()
    counts = _read(bag)
    assert counts[bag_format.INSTRUCTION_TOPIC] == 1
    assert counts[bag_format.TWIST_TOPIC] >= ep.steps - 2  # every command the teleop sent, give or take the edges
    assert counts[bag_format.IMAGE_TOPIC] >= 0.7 * ep.steps  # 10 Hz camera over the same time as 10 Hz commands
    for topic in (bag_format.JOINT_STATE_TOPIC, bag_format.EE_POSE_TOPIC, bag_format.GRIPPER_TOPIC,
                  bag_format.CAMERA_INFO_TOPIC, "/tf"):
        assert counts[topic] > 0, topic
    assert counts["/tf_static"] >= 1  # published once when the arm started, before this episode: kept and written
    _ingest_from_every_source(bag, tmp_path)
    meta = json.loads((bag / bag_format.EPISODE_JSON).read_text())
    assert meta["instruction"] == ep.instruction and meta["success"] is True and meta["status"] == "complete"
    assert meta["task"] == "reach" and meta["seed"] == 3 and meta["robot"] == "panda"
    info = yaml.safe_load((bag / "metadata.yaml").read_text())["rosbag2_bagfile_information"]  # what ros2 bag info reads
    assert info["storage_identifier"] == storage
    custom = info["custom_data"]
    assert custom["lapa.instruction"] == ep.instruction and custom["lapa.success"] == "true"


def _ingest_from_every_source(bag, tmp_path):
    """The recorded bag gives actions from twists, EE poses, /tf and joint states + URDF; the two measured
    kinematic sources (the simulator's link poses, its joint angles through the URDF) agree."""
    import numpy as np

    from lapa_training.data.bag_reader import BagOptions
    from lapa_training.data.dataset import Dataset
    from lapa_training.data.ingest import IngestOptions, ingest

    urdf = str(Path(__file__).resolve().parents[1] / "urdf" / "lapa_panda.urdf")
    actions = {}
    for source in ("twist", "pose", "tf", "joints"):
        out = tmp_path / f"ds_{source}"
        ingest([bag], out, IngestOptions(image_size=0, progress=False, warn=lambda m: None,
                                         bag=BagOptions(actions=source, urdf=urdf)))
        actions[source] = np.asarray(Dataset(out).actions, np.float64)[:-1]
        assert np.isfinite(actions[source][1:, :6]).all(), source  # (step 0 may start before the first command)
        assert np.isfinite(actions[source][:, 6]).mean() > 0.8, source  # NaN only before the first gripper command
    tf, joints = actions["tf"][1:], actions["joints"][1:]
    assert np.abs(tf[:, :6] - joints[:, :6]).max() < 1e-4
    assert np.abs(tf[:, :3]).sum() > 0.05  # the arm moved


def test_episode_control_services_refuse_mistakes_and_discard_leaves_nothing(tmp_path, ros, teleop):
    from lapa_interfaces.srv import StartEpisode, StopEpisode
    from std_srvs.srv import Trigger

    rec = _recorder(tmp_path)
    try:
        assert teleop.start_client.wait_for_service(timeout_sec=20)
        call = teleop._call
        # the first request after discovery can be lost in DDS; this one is refused, so it may go twice
        empty = call(teleop.start_client, StartEpisode.Request(instruction="  "), resend=True)
        assert not empty.success and "empty instruction" in empty.message
        bad_name = call(teleop.start_client, StartEpisode.Request(instruction="x", name="../escape"))
        assert not bad_name.success and "bad episode name" in bad_name.message
        idle = call(teleop.stop_client, StopEpisode.Request(task_success=True))
        assert not idle.success and idle.message == "not recording"

        ok = call(teleop.start_client, StartEpisode.Request(instruction="wave", name="keep_me"))
        assert ok.success, ok.message
        # the very same start again (a client re-sending a request whose answer was lost) is acknowledged
        again = call(teleop.start_client, StartEpisode.Request(instruction="wave", name="keep_me"))
        assert again.success and again.bag_path == ok.bag_path and "start repeated" in again.message
        twice = call(teleop.start_client, StartEpisode.Request(instruction="wave again"))
        assert not twice.success and "already recording 'keep_me'" in twice.message
        assert call(teleop.stop_client, StopEpisode.Request(task_success=False)).success
        taken = call(teleop.start_client, StartEpisode.Request(instruction="wave", name="keep_me"))
        assert not taken.success and "already exists" in taken.message

        assert call(teleop.start_client, StartEpisode.Request(instruction="oops", name="drop_me")).success
        time.sleep(0.3)
        dropped = call(teleop.discard_client, Trigger.Request())
        assert dropped.success and "drop_me" in dropped.message
    finally:
        assert rec.stop() == 0, rec.output()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep_me"]
    assert json.loads((tmp_path / "keep_me" / bag_format.EPISODE_JSON).read_text())["success"] is False


def test_sigkill_mid_episode_leaves_earlier_episodes_intact_and_marks_the_cut_one(tmp_path, sim):
    from lapa_interfaces.srv import StartEpisode

    rec = _recorder(tmp_path, name="lapa_recorder_killed")
    with spinning_teleop("/lapa_recorder_killed") as teleop:
        teleop.wait_ready(timeout=60)
        first = teleop.run_episode("reach", 5)
        started = teleop._call(teleop.start_client, StartEpisode.Request(instruction="doomed", name="cut_short"))
        assert started.success
        time.sleep(1.0)  # images and states stream into the second bag
        rec.proc.send_signal(signal.SIGKILL)
        rec.proc.wait(timeout=10)

    assert _read(first.bag_path)[bag_format.IMAGE_TOPIC] > 0  # fully readable after the crash
    assert json.loads((tmp_path / "reach_000005" / bag_format.EPISODE_JSON).read_text())["status"] == "complete"
    assert not (tmp_path / "cut_short").exists()  # never looks like a finished episode
    staged = tmp_path / bag_format.STAGING_DIR / "cut_short"
    assert json.loads((staged / bag_format.EPISODE_JSON).read_text())["status"] == bag_format.STATUS_RECORDING

    from lapa_training.data.ingest import IngestOptions, ingest

    report = ingest([tmp_path], tmp_path / "dataset", IngestOptions(image_size=32, progress=False))
    assert report.episodes_added == 1 and len(report.incomplete) == 1 and "cut_short" in report.incomplete[0]


def test_sigterm_while_recording_saves_the_episode_with_unknown_success(tmp_path, sim, teleop):
    from lapa_interfaces.srv import StartEpisode

    rec = _recorder(tmp_path, storage="sqlite3")
    assert teleop.start_client.wait_for_service(timeout_sec=20)
    # a service answering does not mean the camera subscription is matched yet: wait for it too
    wait_for(lambda: any(i.node_name == "lapa_recorder" for i in
                         teleop.get_subscriptions_info_by_topic(bag_format.IMAGE_TOPIC)), 20,
             what="the recorder's camera subscription")
    from rclpy.qos import DurabilityPolicy, QoSProfile
    from std_msgs.msg import String

    status: list[dict] = []
    sub = teleop.create_subscription(String, "/lapa_recorder/status", lambda m: status.append(json.loads(m.data)),
                                     QoSProfile(depth=10, durability=DurabilityPolicy.TRANSIENT_LOCAL))
    assert teleop._call(teleop.start_client, StartEpisode.Request(instruction="hold still", name="interrupted")).success
    # camera frames are best-effort: wait until the recorder reports some (its status counts them per
    # topic), not a fixed time, which a loaded machine can let pass without one
    wait_for(lambda: any(s.get("topics", {}).get(bag_format.IMAGE_TOPIC, 0) > 0 for s in status), 30,
             what="the recorder's first camera frames")
    teleop.destroy_subscription(sub)
    assert rec.stop(signal.SIGTERM) == 0, rec.output()
    meta = json.loads((tmp_path / "interrupted" / bag_format.EPISODE_JSON).read_text())
    assert meta["success"] is None and meta["stopped_by"] == "shutdown"
    assert _read(tmp_path / "interrupted")[bag_format.IMAGE_TOPIC] > 0


@pytest.mark.parametrize("params, message", [
    ({"storage": "zip"}, "parameter 'storage': 'zip' is not one of mcap, sqlite3"),
    ({"twist_topic": "'no spaces allowed'"}, "parameter 'twist_topic'"),
    ({"output_dir": "/proc/lapa-cannot-write-here"}, "parameter 'output_dir': cannot create"),
])
def test_bad_recorder_parameters_exit_with_a_clear_error(ros, tmp_path, params, message):
    code, output = run_to_exit(RECORDER, {"output_dir": str(tmp_path), **params})
    assert code == 2, output
    assert message in output and "Traceback" not in output, output
