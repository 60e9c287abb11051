"""Actions from bags as physical arms record them, written by libraries other than ours.

A known motion of the simulated Panda (the simulator's own link poses, joint positions and TCP) is
written three ways, each with one action source only: /tf + /tf_static as robot_state_publisher
publishes them, /joint_states split across an arm and a gripper publisher, and commanded twists.
Each is written by the mcap-ros2-support writer (a bare .mcap file) and by rosbags' sqlite3 writer.
Ingested, all must give the motion: translation within 1 mm and rotation within 1 mrad per step,
the gripper exact.
"""

from __future__ import annotations

from pathlib import Path

import mujoco
import numpy as np
import pytest
from rosbags.rosbag2 import StoragePlugin, Writer
from transforms3d.axangles import mat2axangle
from transforms3d.euler import mat2euler

from lapa_cli.main import main as lapa_main
from lapa_training.data.bag_format import typestore
from lapa_training.data.bag_reader import BagOptions
from lapa_training.data.dataset import Dataset
from lapa_training.data.ingest import IngestError, IngestOptions, ingest

ROOT = Path(__file__).resolve().parents[1]
URDF = ROOT / "urdf" / "lapa_panda.urdf"
RATE = 10.0
SUBSTEPS = 4  # /tf and arm joint states at 40 Hz, images and commands at 10 Hz
STEPS = 14
T0 = 1_700_000_000 * 10**9
SAMPLE_NS = int(1e9 / RATE / SUBSTEPS)
ARM_LINKS = [f"panda_link{i}" for i in range(1, 8)]
FIXED_LINKS = ["panda_link8", "panda_hand", "panda_hand_tcp"]
INSTRUCTION = "reach the red block"
TS = typestore()


# ---------------------------------------------------------------- the known motion, from the simulator
def _pose(env, body: str) -> np.ndarray:
    b = env.model.body(body).id
    out = np.eye(4)
    out[:3, :3] = env.data.xmat[b].reshape(3, 3)
    out[:3, 3] = env.data.xpos[b]
    return out


@pytest.fixture(scope="module")
def motion():
    """Samples of a scripted reach at 40 Hz: link poses, joints, TCP; commands and images at 10 Hz."""
    from lapa_sim.env import TabletopEnv
    from lapa_sim.expert import ScriptedExpert

    env = TabletopEnv(image_size=(16, 16))
    obs = env.reset("reach", 7)
    expert = ScriptedExpert(env.episode, noise=0.0, seed=7)
    samples, images, openings = [], [], []
    for k in range(STEPS + 1):
        images.append(env.render("front"))
        twist, opening = expert.act(obs)
        opening = float(k % 5 < 3)  # a gripper that opens and closes, so the test sees it change
        for sub in range(SUBSTEPS):
            mujoco.mj_kinematics(env.model, env.data)  # link poses of the current qpos (mj_step leaves the previous)
            world = {name: _pose(env, name) for name in ["panda_link0", *ARM_LINKS, *FIXED_LINKS]}
            samples.append({"t": T0 + (k * SUBSTEPS + sub) * SAMPLE_NS, "links": world,
                            "q": np.array(env.observe().joint_pos, float)})
            if k == STEPS:
                break
            if sub == 0:
                env.command(twist, opening)
            env.advance(1.0 / RATE / SUBSTEPS)
        openings.append(opening)
        obs = env.observe()
    names = list(env.observe().joint_names)
    env.close()
    grid = [s for s in samples if (s["t"] - T0) % (SUBSTEPS * SAMPLE_NS) == 0]
    tcp = np.stack([s["links"]["panda_hand_tcp"] for s in grid])
    # the expected actions, computed here with transforms3d
    expected = np.zeros((STEPS, 6))
    for k in range(STEPS):
        expected[k, :3] = tcp[k + 1, :3, 3] - tcp[k, :3, 3]
        expected[k, 3:] = mat2euler(tcp[k + 1, :3, :3] @ tcp[k, :3, :3].T, "sxyz")
    return {"samples": samples, "grid": grid, "images": images, "openings": openings[:STEPS],
            "joint_names": names, "tcp": tcp, "expected": expected}


# ---------------------------------------------------------------- messages as plain dicts (both writers take them)
def _stamp(t: int) -> dict:
    return {"sec": t // 10**9, "nanosec": t % 10**9}


def _header(t: int, frame: str = "") -> dict:
    return {"stamp": _stamp(t), "frame_id": frame}


def _transform(parent: str, child: str, t: int, mat: np.ndarray) -> dict:
    from transforms3d.quaternions import mat2quat

    w, x, y, z = mat2quat(mat[:3, :3])
    p = mat[:3, 3]
    return {"header": _header(t, parent), "child_frame_id": child,
            "transform": {"translation": {"x": p[0], "y": p[1], "z": p[2]},
                          "rotation": {"x": x, "y": y, "z": z, "w": w}}}


def _edge(links: dict, parent: str, child: str) -> np.ndarray:
    return np.linalg.inv(links[parent]) @ links[child]


def episode_messages(motion, source: str) -> list[tuple[str, str, int, dict]]:
    """(topic, type, receive time, message) of an episode whose only action source is `source`."""
    msgs = [("/lapa/instruction", "std_msgs/msg/String", T0 - 10**8, {"data": INSTRUCTION})]
    for k, rgb in enumerate(motion["images"]):
        t = T0 + k * SUBSTEPS * SAMPLE_NS
        msgs.append(("/camera/image_raw", "sensor_msgs/msg/Image", t + 2_000_000,
                     {"header": _header(t, "camera"), "height": 16, "width": 16, "encoding": "rgb8",
                      "is_bigendian": 0, "step": 48, "data": rgb.tobytes()}))
        if k < STEPS:
            msgs.append(("/gripper/command", "std_msgs/msg/Float64", t + 1_000_000, {"data": motion["openings"][k]}))
    first = motion["samples"][0]["links"]
    if source == "tf":
        static = [_transform("world", "panda_link0", T0, first["panda_link0"])]
        chain = ["panda_link7", *FIXED_LINKS]
        static += [_transform(a, b, T0, _edge(first, a, b)) for a, b in zip(chain, chain[1:])]
        msgs.append(("/tf_static", "tf2_msgs/msg/TFMessage", T0 - 10**8, {"transforms": static}))
        arm = ["panda_link0", *ARM_LINKS]
        for s in motion["samples"]:
            tfs = [_transform(a, b, s["t"], _edge(s["links"], a, b)) for a, b in zip(arm, arm[1:])]
            msgs.append(("/tf", "tf2_msgs/msg/TFMessage", s["t"] + 500_000, {"transforms": tfs}))
    elif source == "joints":
        names = motion["joint_names"]
        for i, s in enumerate(motion["samples"]):  # an arm driver at 40 Hz, a gripper driver at 20 Hz
            msgs.append(("/joint_states", "sensor_msgs/msg/JointState", s["t"] + 700_000,
                         {"header": _header(s["t"]), "name": names[:7], "position": s["q"][:7].tolist(),
                          "velocity": [], "effort": []}))
            if i % 2 == 0:
                msgs.append(("/joint_states", "sensor_msgs/msg/JointState", s["t"] + 900_000,
                             {"header": _header(s["t"]), "name": names[7:], "position": s["q"][7:].tolist(),
                              "velocity": [], "effort": []}))
    elif source == "twist":  # the twist that makes the known motion, held over each step
        tcp = motion["tcp"]
        for k in range(STEPS):
            t = T0 + k * SUBSTEPS * SAMPLE_NS
            v = (tcp[k + 1, :3, 3] - tcp[k, :3, 3]) * RATE
            axis, angle = mat2axangle(tcp[k + 1, :3, :3] @ tcp[k, :3, :3].T)
            w = np.asarray(axis) * angle * RATE
            msgs.append(("/servo_node/delta_twist_cmds", "geometry_msgs/msg/TwistStamped", t + 1_000_000,
                         {"header": _header(t, "panda_link0"),
                          "twist": {"linear": dict(zip("xyz", map(float, v))),
                                    "angular": dict(zip("xyz", map(float, w)))}}))
    return msgs


def write_mcap_ros2(path: Path, msgs) -> Path:
    """A bare .mcap file from the mcap-ros2-support writer (no rosbag2 directory, no metadata.yaml)."""
    from mcap_ros2.writer import Writer as McapWriter

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        writer = McapWriter(f)
        schemas = {}
        for topic, typename, t, msg in sorted(msgs, key=lambda m: m[2]):
            if typename not in schemas:
                text = TS.generate_msgdef(typename, ros_version=2)[0]
                schemas[typename] = writer.register_msgdef(typename.replace("/msg/", "/"), text)
            writer.write_message(topic, schemas[typename], msg, log_time=t, publish_time=t)
        writer.finish()
    return path


def write_rosbags_sqlite3(path: Path, msgs) -> Path:
    """A rosbag2 directory from rosbags' sqlite3 writer (not the MCAP writer our recorder uses)."""
    with Writer(path, version=9, storage_plugin=StoragePlugin.SQLITE3) as w:
        conns = {}
        for topic, typename, t, msg in sorted(msgs, key=lambda m: m[2]):
            if topic not in conns:
                conns[topic] = w.add_connection(topic, typename, typestore=TS)
            w.write(conns[topic], t, TS.serialize_cdr(_to_rosbags(typename, msg), typename))
    return path


def _to_rosbags(typename: str, value):
    """A message dict as a rosbags message object of typename (rosbags' field descriptions: 1 primitive,
    2 message, 3 array, 4 sequence)."""
    kwargs = {}
    for name, (kind, detail) in TS.fielddefs[typename][1]:
        v = value[name]
        if kind == 2:
            kwargs[name] = _to_rosbags(detail, v)
        elif kind in (3, 4):
            sub_kind, sub_detail = detail[0]
            if sub_kind == 2:
                kwargs[name] = [_to_rosbags(sub_detail, x) for x in v]
            elif sub_detail[0] == "string":
                kwargs[name] = list(v)
            else:
                kwargs[name] = np.frombuffer(v, np.uint8) if isinstance(v, bytes) else np.asarray(v, sub_detail[0])
        else:
            kwargs[name] = v
    return TS.types[typename](**kwargs)


WRITERS = {"mcap-ros2-support": lambda d, name, msgs: write_mcap_ros2(d / f"{name}.mcap", msgs),
           "rosbags-sqlite3": lambda d, name, msgs: write_rosbags_sqlite3(d / name, msgs)}


def quiet(**kw) -> IngestOptions:
    kw.setdefault("progress", False)
    kw.setdefault("warn", lambda message: None)
    kw.setdefault("image_size", 0)
    return IngestOptions(**kw)


def ingested_actions(path: Path, out: Path, **bag) -> tuple[np.ndarray, dict]:
    ingest([path], out, quiet(bag=BagOptions(**bag)))
    ds = Dataset(out)
    return np.asarray(ds.actions, np.float64), ds.episodes[0]


# ---------------------------------------------------------------- tests
@pytest.mark.parametrize("writer", WRITERS)
def test_tf_joint_states_and_twists_give_the_known_motion(motion, tmp_path, writer):
    expected = motion["expected"]
    got = {}
    for source, extra in (("tf", {}), ("joints", {"urdf": str(URDF)}), ("twist", {})):
        bag = WRITERS[writer](tmp_path / "bags", source, episode_messages(motion, source))
        actions, episode = ingested_actions(bag, tmp_path / f"ds_{source}", **extra)  # auto picks the only source
        assert episode["provenance"]["action_source"] == source and episode["instruction"] == INSTRUCTION
        assert actions.shape == (STEPS + 1, 7) and np.isnan(actions[-1]).all()
        got[source] = actions[:-1]
    for source, actions in got.items():
        assert np.abs(actions[:, :3] - expected[:, :3]).max() <= 1e-3, source  # 1 mm per step
        assert np.abs(actions[:, 3:6] - expected[:, 3:]).max() <= 1e-3, source  # 1 mrad per step
        assert np.array_equal(actions[:, 6], 1.0 - np.array(motion["openings"])), source
    assert np.abs(got["tf"][:, :6] - got["joints"][:, :6]).max() <= 1e-4
    assert np.abs(expected[:, :3]).sum() > 0.05  # the arm did move (about 1 cm per step)


def test_finger_joint_is_the_gripper(motion, tmp_path):
    msgs = [m for m in episode_messages(motion, "joints") if m[0] != "/gripper/command"]
    bag = write_mcap_ros2(tmp_path / "joints.mcap", msgs)
    actions, episode = ingested_actions(bag, tmp_path / "ds", urdf=str(URDF), gripper_joint="panda_finger_joint1")
    finger = np.array([s["q"][7] for s in motion["grid"]])
    assert episode["provenance"]["gripper_source"] == "joint"
    # closure at the end of each step from the URDF limits 0 (closed) .. 0.04 (open)
    assert np.allclose(actions[:-1, 6], np.clip((0.04 - finger[1:]) / 0.04, 0, 1), atol=1e-9)
    assert actions[:-1, 6].max() - actions[:-1, 6].min() > 0.3  # it opened and closed


def test_tf_starting_late_keeps_the_steps_without_actions(motion, tmp_path):
    late = T0 + 3 * SUBSTEPS * SAMPLE_NS
    msgs = [m for m in episode_messages(motion, "tf") if m[0] != "/tf" or m[2] >= late]
    warnings: list[str] = []
    ingest([write_mcap_ros2(tmp_path / "late.mcap", msgs)], tmp_path / "ds", quiet(warn=warnings.append))
    actions = np.asarray(Dataset(tmp_path / "ds").actions, np.float64)
    # no transform is held for more than half a control period before the first one: steps 0-2 are unknown
    assert np.isnan(actions[:3, :6]).all() and np.isfinite(actions[3:-1, :6]).all()
    assert any("steps have no tf data" in w for w in warnings), warnings


@pytest.mark.parametrize("options, message", [
    ({"actions": "tf", "tcp_frame": "tool0"}, "the TCP frame 'tool0' never appears on /tf or /tf_static"),
    ({"actions": "tf", "base_frame": "odom"}, "the base frame 'odom' never appears"),
])
def test_tf_errors(motion, tmp_path, options, message):
    bag = write_mcap_ros2(tmp_path / "tf.mcap", episode_messages(motion, "tf"))
    with pytest.raises(IngestError, match=message):
        ingest([bag], tmp_path / "ds", quiet(bag=BagOptions(**options)))


def test_unconnected_frames(motion, tmp_path):
    msgs = episode_messages(motion, "tf")
    static = next(m for m in msgs if m[0] == "/tf_static")
    static[3]["transforms"].append(_transform("camera_mount", "camera_link", T0, np.eye(4)))
    bag = write_mcap_ros2(tmp_path / "tf.mcap", msgs)
    with pytest.raises(IngestError, match="frames 'panda_link0' and 'camera_link' are not connected"):
        ingest([bag], tmp_path / "ds", quiet(bag=BagOptions(actions="tf", tcp_frame="camera_link")))


def test_joint_state_errors(motion, tmp_path):
    msgs = [m for m in episode_messages(motion, "joints")]
    for m in msgs:  # the arm driver leaves out joint 4
        if m[0] == "/joint_states" and "panda_joint4" in m[3]["name"]:
            i = m[3]["name"].index("panda_joint4")
            m[3]["name"] = m[3]["name"][:i] + m[3]["name"][i + 1:]
            m[3]["position"] = m[3]["position"][:i] + m[3]["position"][i + 1:]
    bag = write_mcap_ros2(tmp_path / "j.mcap", msgs)
    with pytest.raises(IngestError, match="joint 'panda_joint4' of the chain panda_link0 -> panda_hand_tcp is never"):
        ingest([bag], tmp_path / "ds", quiet(bag=BagOptions(actions="joints", urdf=str(URDF))))
    with pytest.raises(IngestError, match="no --urdf"):
        ingest([bag], tmp_path / "ds", quiet(bag=BagOptions(actions="joints")))


def test_cli_one_line_errors_and_actions_flag(motion, tmp_path, capsys):
    bag = write_mcap_ros2(tmp_path / "bags" / "joints.mcap", episode_messages(motion, "joints"))
    broken = tmp_path / "broken.urdf"
    broken.write_text("<robot name='x'><link name='a'/><joint name='j' type='revolute'>")
    for argv, message in (
            (["--actions", "joints", "--urdf", str(broken)], "the URDF does not parse"),
            (["--actions", "joints", "--urdf", str(tmp_path / "none.urdf")], "cannot read the URDF"),
            (["--actions", "joints", "--urdf", str(URDF), "--tcp-frame", "tool0"], "no link 'tool0' in the URDF")):
        assert lapa_main(["data", "ingest", str(bag), "--out", str(tmp_path / "ds"), *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and "Traceback" not in err, err
    assert lapa_main(["data", "ingest", str(tmp_path / "bags"), "--out", str(tmp_path / "ds"), "--actions", "joints",
                      "--urdf", str(URDF), "--image-size", "0"]) == 0
    assert "1 episodes (1 with actions)" in capsys.readouterr().out


def test_bag_info(motion, tmp_path, capsys):
    bag = write_rosbags_sqlite3(tmp_path / "tf", episode_messages(motion, "tf"))
    assert lapa_main(["data", "info", str(bag)]) == 0
    out = capsys.readouterr().out
    assert "/tf " in out and "tf2_msgs/msg/TFMessage" in out and "40.0 Hz" in out, out
    assert "actions: tf (panda_link0 -> panda_hand_tcp" in out and "gripper: topic /gripper/command" in out, out


def test_skip_bad_skips_an_input_with_nothing_in_it(motion, tmp_path):
    (tmp_path / "empty").mkdir()
    bag = write_mcap_ros2(tmp_path / "bags" / "tf.mcap", episode_messages(motion, "tf"))
    with pytest.raises(IngestError, match="no bags, videos or datasets found"):
        ingest([tmp_path / "empty", bag], tmp_path / "ds", quiet())
    report = ingest([tmp_path / "empty", tmp_path / "missing", bag], tmp_path / "ds", quiet(skip_bad=True))
    assert report.episodes_added == 1 and [p for p, _ in report.skipped] == [str(tmp_path / "empty"),
                                                                          str(tmp_path / "missing")]


def test_unsynchronised_clocks_are_refused(motion, tmp_path):
    """Joint states stamped by a clock 5 s ahead of the camera's: refused when forced, action-free in auto."""
    msgs = episode_messages(motion, "joints")
    for m in msgs:
        if m[0] == "/joint_states":
            m[3]["header"] = _header(m[2] + 5 * 10**9)
    bag = write_mcap_ros2(tmp_path / "clocks.mcap", msgs)
    with pytest.raises(IngestError, match=r"header stamps on /camera/image_raw and /joint_states disagree by 5.00 s"):
        ingest([bag], tmp_path / "ds", quiet(bag=BagOptions(actions="joints", urdf=str(URDF))))
    warnings: list[str] = []
    report = ingest([bag], tmp_path / "ds", quiet(bag=BagOptions(urdf=str(URDF)), warn=warnings.append))
    assert report.episodes_with_actions == 0 and any("not synchronised" in w for w in warnings), warnings


def test_dropped_transforms(motion, tmp_path):
    """/tf drops out for 0.4 s mid-episode: the steps it spans have no actions (never zeros), the rest are exact."""
    gap = (T0 + 5 * SUBSTEPS * SAMPLE_NS, T0 + 9 * SUBSTEPS * SAMPLE_NS)
    msgs = [m for m in episode_messages(motion, "tf") if not (m[0] == "/tf" and gap[0] < m[2] - 500_000 < gap[1])]
    warnings: list[str] = []
    ingest([write_mcap_ros2(tmp_path / "drop.mcap", msgs)], tmp_path / "ds", quiet(warn=warnings.append))
    actions = np.asarray(Dataset(tmp_path / "ds").actions, np.float64)[:-1]
    lost = np.isnan(actions[:, :6]).any(axis=1)
    assert lost.tolist() == [5 <= k < 9 for k in range(STEPS)]
    assert np.abs(actions[~lost, :6] - motion["expected"][~lost]).max() <= 1e-6
    assert any("4 of 14 steps have no tf data" in w for w in warnings), warnings


def test_joint_state_history_merges_publishers_and_refuses_gaps():
    from lapa_training.data.joint_states import JointStateHistory

    h = JointStateHistory()
    ms = 1_000_000
    h.add(0, ["a", "b"], [0.0, 1.0])
    h.add(100 * ms, ["a", "b"], [1.0, 2.0])
    h.add(50 * ms, ["c"], [5.0])  # another publisher, another joint
    h.add(500 * ms, ["a", "b"], [2.0, 3.0])
    h.add(600 * ms, ["a"], [])  # an effort-only message: no positions
    q = h.positions_at(["a", "c"], np.array([50, 300, 520, 560]) * ms, max_outside_ns=30 * ms, max_gap_ns=250 * ms)
    assert q["a"][0] == 0.5 and np.isnan(q["a"][1]) and q["a"][2] == 2.0 and np.isnan(q["a"][3])
    assert q["c"][0] == 5.0 and np.isnan(q["c"][1:]).all()
    assert h.names == ["a", "b", "c"] and h.without_positions == 1
    with pytest.raises(KeyError, match="d"):
        h.positions_at(["d"], np.zeros(1, np.int64), 0)


# ---------------------------------------------------------------- the gripper through control_msgs/GripperCommand
SEP = "=" * 80 + "\n"
# as rosbag2 stores the definition of the type on <action>/_action/send_goal/_service_event (fields as in
# ros-controls/control_msgs GripperCommand.action and ros2/rcl_interfaces ServiceEventInfo.msg)
SEND_GOAL_EVENT_DEF = (
    "service_msgs/ServiceEventInfo info\n"
    "control_msgs/action/GripperCommand_SendGoal_Request[<=1] request\n"
    "control_msgs/action/GripperCommand_SendGoal_Response[<=1] response\n"
    + SEP + "MSG: service_msgs/ServiceEventInfo\nuint8 REQUEST_SENT=0\nuint8 REQUEST_RECEIVED=1\n"
    "uint8 RESPONSE_SENT=2\nuint8 RESPONSE_RECEIVED=3\nuint8 event_type\nbuiltin_interfaces/Time stamp\n"
    "char[16] client_gid\nint64 sequence_number\n"
    + SEP + "MSG: builtin_interfaces/Time\nint32 sec\nuint32 nanosec\n"
    + SEP + "MSG: control_msgs/action/GripperCommand_SendGoal_Request\nunique_identifier_msgs/UUID goal_id\n"
    "control_msgs/action/GripperCommand_Goal goal\n"
    + SEP + "MSG: unique_identifier_msgs/UUID\nuint8[16] uuid\n"
    + SEP + "MSG: control_msgs/action/GripperCommand_Goal\ncontrol_msgs/GripperCommand command\n"
    + SEP + "MSG: control_msgs/GripperCommand\nfloat64 position\nfloat64 max_effort\n"
    + SEP + "MSG: control_msgs/action/GripperCommand_SendGoal_Response\nbool accepted\nbuiltin_interfaces/Time stamp\n")
EVENT_TYPE = "control_msgs/action/GripperCommand_SendGoal_Event"


def test_gripper_from_gripper_command_goals(motion, tmp_path, capsys):
    """Goals of a GripperCommand action (0.04 open .. 0 closed per finger), each reported by the client and the
    server; control_msgs is not in our typestore, so its types come from the definition stored in the bag."""
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore

    store = get_typestore(Stores.ROS2_KILTED)  # the writer's own store, not ingest's
    store.register({k: v for k, v in get_types_from_msg(SEND_GOAL_EVENT_DEF, EVENT_TYPE).items()
                    if k not in store.types})
    T = store.types
    topic = "/gripper_controller/gripper_cmd" + "/_action/send_goal/_service_event"
    bag = tmp_path / "goals"
    with Writer(bag, version=9, storage_plugin=StoragePlugin.MCAP) as w:
        conns = {}
        msgs = [m for m in episode_messages(motion, "tf") if m[0] != "/gripper/command"]
        for t_topic, typename, t, msg in sorted(msgs, key=lambda m: m[2]):
            if t_topic not in conns:
                conns[t_topic] = w.add_connection(t_topic, typename, typestore=TS)
            w.write(conns[t_topic], t, TS.serialize_cdr(_to_rosbags(typename, msg), typename))
        events = w.add_connection(topic, EVENT_TYPE, msgdef=SEND_GOAL_EVENT_DEF, rihs01="RIHS01_" + "0" * 64)
        for k, opening in enumerate(motion["openings"]):
            if k and opening == motion["openings"][k - 1]:
                continue  # a goal when the command changes, as a teleop sends them
            t = T0 + k * SUBSTEPS * SAMPLE_NS + 1_000_000
            for event_type, delay in ((0, 0), (1, 300_000)):  # REQUEST_SENT by the client, REQUEST_RECEIVED
                ev = T[EVENT_TYPE](
                    info=T["service_msgs/msg/ServiceEventInfo"](
                        event_type=event_type, stamp=T["builtin_interfaces/msg/Time"](sec=(t + delay) // 10**9,
                                                                                      nanosec=(t + delay) % 10**9),
                        client_gid=np.arange(16, dtype=np.uint8), sequence_number=k),
                    request=[T["control_msgs/action/GripperCommand_SendGoal_Request"](
                        goal_id=T["unique_identifier_msgs/msg/UUID"](uuid=np.full(16, k, np.uint8)),
                        goal=T["control_msgs/action/GripperCommand_Goal"](
                            command=T["control_msgs/msg/GripperCommand"](position=0.04 * opening, max_effort=20.0)))],
                    response=[])
                w.write(events, t + delay, store.serialize_cdr(ev, EVENT_TYPE))
    with pytest.raises(IngestError, match="GripperCommand goals on .* need the positions that mean open and closed"):
        ingest([bag], tmp_path / "ds", quiet())
    actions, episode = ingested_actions(bag, tmp_path / "ds", gripper_open=0.04, gripper_closed=0.0)
    assert episode["provenance"]["gripper_source"] == "action"
    assert np.array_equal(actions[:-1, 6], 1.0 - np.array(motion["openings"]))
    actions, _ = ingested_actions(bag, tmp_path / "ds2", urdf=str(URDF), gripper_joint="panda_finger_joint1")
    assert np.array_equal(actions[:-1, 6], 1.0 - np.array(motion["openings"]))  # scaled by the URDF's limits
    assert lapa_main(["data", "info", str(bag)]) == 0
    assert "gripper: GripperCommand goals on /gripper_controller/gripper_cmd/_action" in capsys.readouterr().out


# ---------------------------------------------------------------- several cameras
def test_several_cameras_are_stored_at_the_first_cameras_times(motion, tmp_path, capsys):
    """A wrist camera at 15 Hz that starts 0.15 s after the front one: each stored row is its newest image
    at the front camera's frame time; trainers and labelling pick a camera by name."""
    msgs = episode_messages(motion, "tf")
    wrist_t = [T0 + 150_000_000 + j * 66_666_667 for j in range(22)]
    for j, t in enumerate(wrist_t):  # image j is filled with the value j
        msgs.append(("/wrist/image_raw", "sensor_msgs/msg/Image", t + 4_000_000,
                     {"header": _header(t, "wrist"), "height": 8, "width": 8, "encoding": "rgb8",
                      "is_bigendian": 0, "step": 24, "data": bytes([j]) * 192}))
    bag = write_mcap_ros2(tmp_path / "two_cams.mcap", msgs)
    warnings: list[str] = []
    ingest([bag], tmp_path / "ds", quiet(bag=BagOptions(image_topic="/camera/image_raw",
                                                        extra_image_topics=("/wrist/image_raw",)),
                                         warn=warnings.append))
    front, wrist = Dataset(tmp_path / "ds"), Dataset(tmp_path / "ds", camera="/wrist/image_raw")
    assert front.cameras == ["/camera/image_raw", "/wrist/image_raw"] and wrist.camera == "/wrist/image_raw"
    assert np.array_equal(np.asarray(front.frames), np.stack(motion["images"]))
    grid = [T0 + k * SUBSTEPS * SAMPLE_NS for k in range(STEPS + 1)]
    expected = [max([j for j, t in enumerate(wrist_t) if t <= g + 1_000_000], default=0) for g in grid]
    assert [int(f[0, 0, 0]) for f in np.asarray(wrist.frames)] == expected
    assert wrist.frames.shape == (STEPS + 1, 8, 8, 3) and len(wrist.actions) == len(front.actions)
    assert any("starts 2 frame(s) after /camera/image_raw" in w for w in warnings), warnings
    with pytest.raises(IngestError, match=r"no camera '/nope' \(cameras: /camera/image_raw, /wrist/image_raw\)"):
        Dataset(tmp_path / "ds", camera="/nope")
    # a merge keeps both cameras; a dataset of one camera does not merge into it
    ingest([tmp_path / "ds"], tmp_path / "merged", quiet(bag=BagOptions(image_topic="/camera/image_raw",
                                                                        extra_image_topics=("/wrist/image_raw",))))
    assert np.array_equal(np.asarray(Dataset(tmp_path / "merged", camera="/wrist/image_raw").frames),
                          np.asarray(wrist.frames))
    with pytest.raises(IngestError, match="merge needs the same cameras"):
        ingest([tmp_path / "ds"], tmp_path / "one", quiet())
    # the same from the command line; info lists the cameras
    assert lapa_main(["data", "ingest", str(bag), "--out", str(tmp_path / "cli"), "--image-size", "0",
                      "--image-topic", "/camera/image_raw", "--image-topic", "/wrist/image_raw"]) == 0
    assert lapa_main(["data", "info", str(tmp_path / "cli")]) == 0
    assert "cameras      /camera/image_raw, /wrist/image_raw" in capsys.readouterr().out
    # trainers choose the camera with data.camera; a wrong name is a one-line error
    assert lapa_main(["train", "laq", "--data", str(tmp_path / "ds"), "--out", str(tmp_path / "laq"),
                      "--set", "data.camera=/nope"]) == 2
    assert "no camera '/nope'" in capsys.readouterr().err
