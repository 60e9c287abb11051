"""`lapa run sim_demo` (policy server + simulated arm without ROS 2 `launch`), its agreement with
launch/sim_demo.launch.py, and the policy server driving the simulated arm with a real (tiny, random)
VLA checkpoint and with a compressed camera, over real DDS, each node in its own process.

The lapa run tests come first: they start their own lapa_sim_arm, which must be gone before the
module's simulator (unique node name, same global topics) starts for the later tests.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import signal
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import pytest
import yaml
from geometry_msgs.msg import PoseStamped, TwistStamped
from rclpy.action import ActionClient
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image

from conftest import ROOT, Latest, NodeProcess, user_error, wait_for
from lapa_policy_node.graphs import SIM_DEMO
from lapa_core.policy import ConstantPolicy

SIM = "lapa_policy_node.sim_arm_node"
SERVER = "lapa_policy_node.policy_server_node"


@pytest.fixture(scope="module")
def tiny_vla(tmp_path_factory) -> Path:
    """A finetuned-stage VLA with random weights and bins fitted on random actions (about 1 s); a
    random bins head asks for motion of the bins' size, where a random regression head barely moves."""
    import torch

    from lapa_training.vla import ActionBins, VLAConfig, VLAModel

    torch.manual_seed(0)
    model = VLAModel(VLAConfig.tiny(image_size=64, stage="finetune", objective="action", action_head_type="bins"))
    model.set_action_bins(ActionBins.fit(np.random.default_rng(0).normal(size=(5000, 7)) * 0.005))
    return Path(model.save_pretrained(tmp_path_factory.mktemp("tiny_vla") / "policy"))


# ---------------------------------------------------------------------------------------------
# launch/sim_demo.launch.py and `lapa run sim_demo` describe the same graph
# ---------------------------------------------------------------------------------------------
class _Recorded:
    """Stands in for a launch / launch_ros class: remembers how it was constructed."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


class _LaunchConfiguration(_Recorded):
    def perform(self, context):
        return context.launch_configurations[self.args[0]]


def _fake_ros_launch(monkeypatch, share: Path) -> None:
    """Just enough of `launch`, `launch_ros` and `ament_index_python` (none exist here) to run the
    launch file's own code: every action records its arguments."""
    classes = {"launch": {"LaunchDescription": type("LaunchDescription", (_Recorded,), {})},
               "launch.actions": {"DeclareLaunchArgument": type("DeclareLaunchArgument", (_Recorded,), {}),
                                  "OpaqueFunction": type("OpaqueFunction", (_Recorded,), {})},
               "launch.substitutions": {"LaunchConfiguration": _LaunchConfiguration},
               "launch_ros": {}, "launch_ros.actions": {"Node": type("Node", (_Recorded,), {})},
               "ament_index_python": {},
               "ament_index_python.packages": {"get_package_share_directory": lambda package: str(share)}}
    for name, attrs in classes.items():
        module = types.ModuleType(name)
        for key, value in attrs.items():
            setattr(module, key, value)
        monkeypatch.setitem(sys.modules, name, module)


def _launch_nodes(monkeypatch, given: dict[str, str]) -> dict[str, dict]:
    """Run launch/sim_demo.launch.py as `ros2 launch` would with `given` launch arguments:
    node name -> {package, executable, params_file, parameters}."""
    _fake_ros_launch(monkeypatch, ROOT)  # the source tree has the share layout (config/, urdf/)
    spec = importlib.util.spec_from_file_location("sim_demo_launch", ROOT / "launch" / "sim_demo.launch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    description = module.generate_launch_description()
    entities = description.args[0]
    declared = {e.args[0]: e.kwargs for e in entities if type(e).__name__ == "DeclareLaunchArgument"}
    missing = [name for name, kw in declared.items() if "default_value" not in kw and name not in given]
    assert not missing, f"ros2 launch would refuse: no value for {missing}"
    configurations = {name: kw.get("default_value") for name, kw in declared.items()}
    configurations.update(given)
    context = types.SimpleNamespace(launch_configurations=configurations)
    [opaque] = [e for e in entities if type(e).__name__ == "OpaqueFunction"]
    nodes = {}
    for node in opaque.kwargs["function"](context):
        kw = node.kwargs
        files = [Path(p).resolve() for p in kw["parameters"] if isinstance(p, str)]
        params = {k: v for d in kw["parameters"] if isinstance(d, dict) for k, v in d.items()}
        assert len(files) <= 1 and kw["output"] == "screen"
        nodes[kw["name"]] = {"package": kw["package"], "executable": kw["executable"],
                             "params_file": files[0] if files else None, "parameters": params}
    return nodes, declared


def _lapa_run_nodes(argv: list[str]) -> tuple[dict[str, dict], list[str]]:
    """What `lapa run sim_demo ARGV` starts: node name -> the same fields as _launch_nodes, read
    back from the child command lines; plus the nodes it says it cannot start."""
    from lapa_cli import run

    parser = argparse.ArgumentParser()
    run.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["run", "sim_demo", *argv])
    planned = run.plan(SIM_DEMO, {a.name: getattr(args, a.name) for a in SIM_DEMO.arguments})
    scripts = dict(re.findall(r'"(\w+) = ([\w.]+):main"', (ROOT / "setup.py").read_text()))
    modules = {module: exe for exe, module in scripts.items()}
    nodes, skipped = {}, []
    for item in planned:
        if item.argv is None:
            skipped.append(item.spec.name)
            continue
        assert item.argv[:4] == [sys.executable, "-m", "lapa_cli.run", "--node"], item.argv
        assert item.argv[5:7] == ["--ros-args", "--params-file"], item.argv
        rest = item.argv[8:]
        assert rest[0::2] == ["-p"] * (len(rest) // 2), rest
        params = {}
        for assignment in rest[1::2]:
            name, value = assignment.split(":=", 1)
            params[name] = yaml.safe_load(value)  # how rcl reads `-p name:=value`
        nodes[item.spec.name] = {"package": "lapa_ros", "executable": modules[item.argv[4]],
                                 "params_file": Path(item.argv[7]).resolve(), "parameters": params}
    return nodes, skipped


@pytest.mark.parametrize("launch_args, cli_args", [
    ({}, []),
    ({"image_topic": "/wrist/image_raw", "twist_topic": "/servo/cmd", "control_rate": "5", "task": "push",
      "seed": "3"},
     ["--image-topic", "/wrist/image_raw", "--twist-topic", "/servo/cmd", "--control-rate", "5", "--task", "push",
      "--seed", "3"]),
], ids=["defaults", "every-argument"])
def test_launch_file_and_lapa_run_start_the_same_nodes_with_the_same_parameters(monkeypatch, tmp_path,
                                                                                launch_args, cli_args):
    checkpoint = ConstantPolicy.save(tmp_path / "policy", [0] * 7)
    launched, declared = _launch_nodes(monkeypatch, {"checkpoint": str(checkpoint), **launch_args})
    run_nodes, skipped = _lapa_run_nodes(["--checkpoint", str(checkpoint), *cli_args])

    # the same launch arguments / options, the required one without a default
    assert set(declared) == {a.name for a in SIM_DEMO.arguments}
    assert "default_value" not in declared["checkpoint"]
    # everything but robot_state_publisher runs here, exactly as the launch file starts it
    assert skipped == ["robot_state_publisher"]
    rsp = launched.pop("robot_state_publisher")
    assert rsp["executable"] == "robot_state_publisher"
    assert rsp["parameters"] == {"robot_description": (ROOT / "urdf" / "lapa_panda.urdf").read_text()}
    assert run_nodes == launched
    assert set(launched) == {"lapa_sim_arm", "lapa_policy_server"}

    sim, server = launched["lapa_sim_arm"], launched["lapa_policy_server"]
    for name, node in launched.items():
        file = yaml.safe_load(node["params_file"].read_text())
        assert list(file) == [name], f"{node['params_file']} would not apply to the node {name}"
        unknown = set(node["parameters"]) - set(file[name]["ros__parameters"])
        assert not unknown, f"{name}: {unknown} are not parameters in {node['params_file'].name}"
    assert server["parameters"]["checkpoint"] == str(checkpoint.resolve())
    assert server["parameters"]["success_topic"] == "/lapa_sim_arm/success" and sim["parameters"]["servo_handshake"]
    if launch_args:  # each argument reached every node it is meant for, with the parameter's type
        assert sim["parameters"]["image_topic"] == server["parameters"]["image_topic"] == "/wrist/image_raw"
        assert sim["parameters"]["twist_topic"] == server["parameters"]["twist_topic"] == "/servo/cmd"
        assert server["parameters"]["control_rate"] == 5.0 and isinstance(server["parameters"]["control_rate"], float)
        assert sim["parameters"]["task"] == "push" and sim["parameters"]["seed"] == 3
    else:  # arguments left out keep the parameter files' values
        assert set(sim["parameters"]) == {"servo_handshake"}
        assert set(server["parameters"]) == {"checkpoint", "success_topic"}


@pytest.mark.parametrize("argv, needles", [
    (["run", "sim_demo"], ("--checkpoint is required",)),
    (["run", "sim_demo", "--checkpoint", "/nonexistent/policy"],
     ("--checkpoint", "checkpoint not found: /nonexistent/policy")),
    (["run", "sim_demo", "--checkpoint", str(ROOT / "config")], ("no config.json",)),
    (["run"], ("which graph", "sim_demo")),
])
def test_lapa_run_user_mistakes_are_one_line_errors(capsys, argv, needles):
    user_error(capsys, argv, *needles)


# ---------------------------------------------------------------------------------------------
# lapa run sim_demo, end to end
# ---------------------------------------------------------------------------------------------
def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class _LapaRun:
    def __init__(self, *argv: str):
        self.log = tempfile.NamedTemporaryFile(prefix="lapa-run-", suffix=".log", delete=False)
        self.proc = subprocess.Popen([sys.executable, "-m", "lapa_cli.main", "run", "sim_demo", *argv], cwd=ROOT,
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def test_lapa_run_sim_demo_follows_an_instruction_and_stops_cleanly_on_sigint(test_node, tiny_vla):
    twist_topic, image_topic = "/run_demo/servo/delta_twist_cmds", "/run_demo/camera/image_raw"
    twists = Latest(test_node, TwistStamped, twist_topic, 50)
    moving = []  # non-zero twists: the policy commanded motion
    test_node.create_subscription(TwistStamped, twist_topic, lambda m: moving.append(1) if any(
        (m.twist.linear.x, m.twist.linear.y, m.twist.linear.z)) else None, 50)
    frames = Latest(test_node, Image, image_topic, qos_profile_sensor_data)
    run = _LapaRun("--checkpoint", str(tiny_vla), "--instruction", "go to the red block", "--max-steps", "15",
                   "--image-topic", image_topic, "--twist-topic", twist_topic, "--seed", "2",
                   # node-targeted ROS arguments reach only that node (a loaded 2-core machine can
                   # delay a rendered frame past the default 0.25 s camera watchdog)
                   "--ros-args", "-p", "lapa_policy_server:camera_timeout:=1.0")
    try:
        try:
            wait_for(lambda: "goal result:" in run.output() or run.proc.poll() is not None, 90,
                     what="the goal's result")
        except BaseException:
            print(run.output()[-5000:])  # pytest shows it with the failure
            raise
        out = run.output()
        assert run.proc.poll() is None, out
        assert "robot_state_publisher is not available" in out
        assert "[lapa run] goal accepted" in out and "[lapa run] step 1:" in out, out
        steps = [int(s) for s in re.findall(r"\[lapa run\] step (\d+):", out)]
        assert steps and steps == list(range(1, len(steps) + 1)), steps
        assert re.search(r"goal result: \w+ after \d+ steps", out), out
        # the forwarded topics wired the nodes together, and the arm was commanded
        assert frames.count > 0 and len(moving) > 0
        assert "twists on /run_demo/servo/delta_twist_cmds, camera on /run_demo/camera/image_raw" in out  # sim
        assert "camera /run_demo/camera/image_raw, twists to /run_demo/servo/delta_twist_cmds" in out  # server
        assert "seed 2" in out
        children = _children(run.proc.pid)
        assert len(children) == 2, children

        run.proc.send_signal(signal.SIGINT)
        assert run.proc.wait(timeout=30) == 0, run.output()
        out = run.output()
        assert "sent a final zero twist" in out and "[lapa run] all nodes stopped" in out
        assert out.index("[lapa_policy_server]: SIGINT received") < out.index("[lapa_sim_arm]: SIGINT received")
        assert "Traceback" not in out, out
        assert not [pid for pid in children if _alive(pid)], "orphaned node processes"
        tw = twists.get().twist
        assert (tw.linear.x, tw.linear.y, tw.linear.z) == (0.0, 0.0, 0.0)  # the arm was left stopped
    finally:
        run.kill()


def test_lapa_run_ends_with_a_clear_error_when_a_node_dies(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"policy_type": "carrier-pigeon"}')
    run = _LapaRun("--checkpoint", str(broken))
    try:
        wait_for(lambda: _children(run.proc.pid) or run.proc.poll() is not None, 10, what="the nodes to start")
        children = _children(run.proc.pid)
        assert run.proc.wait(timeout=60) == 1
    finally:
        run.kill()
    out = run.output()
    errors = [line for line in out.splitlines() if line.startswith("lapa run: error:")]
    assert len(errors) == 1 and "lapa_policy_server exited with code 2" in errors[0], out
    assert "unknown policy_type 'carrier-pigeon'" in errors[0], out
    assert "Traceback" not in out, out
    assert not [pid for pid in children if _alive(pid)], "the simulated arm was left running"


# ---------------------------------------------------------------------------------------------
# the policy server with a real VLA checkpoint, and with a compressed camera
# ---------------------------------------------------------------------------------------------
SIM_NAME = "run_demo_sim"  # a fresh node name: no client here ever matched an older simulator's


@pytest.fixture(scope="module")
def sim(ros):
    proc = NodeProcess(SIM, {"image_width": 64, "image_height": 64, "camera_rate": 20.0},
                       extra=["-r", f"__node:={SIM_NAME}"])
    yield proc
    assert proc.stop() == 0, proc.output()


@pytest.fixture(scope="module")
def pose(test_node, sim):
    latest = Latest(test_node, PoseStamped, "/ee_pose")
    image = Latest(test_node, Image, "/camera/image_raw", qos_profile_sensor_data)
    wait_for(lambda: latest.get() is not None and image.get() is not None, 60, what="the sim's EE pose and camera")
    return latest


@pytest.fixture
def home(test_node, pose):
    from lapa_interfaces.srv import ResetEpisode

    client = test_node.create_client(ResetEpisode, f"/{SIM_NAME}/reset")
    assert client.wait_for_service(timeout_sec=20)
    future = client.call_async(ResetEpisode.Request(task="reach", seed=0))
    wait_for(future.done, 10, what="the sim to reset")
    assert future.result().success
    test_node.destroy_client(client)
    time.sleep(0.3)  # a fresh pose after the reset
    return pose


def _server(test_node, name: str, checkpoint: Path, **params) -> NodeProcess:
    # Real-time rendering on a loaded 2-core machine hiccups; and a goal waits max(1 s, camera_timeout)
    # for its first frame and EE pose, which a loaded machine may need to deliver after discovery.
    params.setdefault("camera_timeout", 2.0)
    proc = NodeProcess(SERVER, {"checkpoint": str(checkpoint), **params}, extra=["-r", f"__node:={name}"])
    wait_for(lambda: "policy server ready" in proc.output() or proc.proc.poll() is not None, 60,
             what="the policy server")
    assert proc.proc.poll() is None, proc.output()
    for line in ("first camera frame", "first EE pose"):  # delivered, not only discovered
        wait_for(lambda: line in proc.output(), 30, what=f"'{line}' in the server log: {proc.output()[-600:]}")
    return proc


def _run_goal(ros, name: str, **goal):
    """Send a goal (resent if unanswered right after discovery); -> (result, feedback list).

    The client gets a node of its own that starts spinning only once the client exists: rclpy's
    ActionClient registers itself with its node before it is fully built, and a node spinning in
    another thread (like test_node) can then fail on it."""
    from lapa_interfaces.action import FollowInstruction
    from lapa_policy_node.runtime import spinning

    node = ros.create_node(f"run_demo_client_{name}")
    client = ActionClient(node, FollowInstruction, f"/{name}/follow_instruction")
    with spinning(node):
        assert client.wait_for_server(timeout_sec=30)
        feedback = []  # (goal id, feedback): a goal whose answer was lost may run beside the one resent
        for _ in range(3):
            future = client.send_goal_async(FollowInstruction.Goal(**goal),
                                            feedback_callback=lambda f: feedback.append((bytes(f.goal_id.uuid),
                                                                                         f.feedback)))
            deadline = time.monotonic() + 5.0
            while not future.done() and time.monotonic() < deadline:
                time.sleep(0.01)
            if future.done():
                break
        else:
            pytest.fail("the policy server never answered a goal request")
        handle = future.result()
        assert handle.accepted
        result = handle.get_result_async()
        wait_for(result.done, 60, what="the goal's result")
        return result.result(), [f for goal_id, f in feedback if goal_id == bytes(handle.goal_id.uuid)]


def _tcp(pose) -> np.ndarray:
    msg = pose.get().pose
    return np.array([msg.position.x, msg.position.y, msg.position.z,
                     msg.orientation.w, msg.orientation.x, msg.orientation.y, msg.orientation.z])


def test_the_server_runs_a_real_vla_checkpoint_and_the_arm_moves(ros, test_node, home, tiny_vla):
    _the_arm_moves_as_the_checkpoint_says(ros, test_node, home, tiny_vla, "run_demo_vla_server")


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory) -> Path:
    """A finetuned-stage VLA on a tiny random Idefics3 (SmolVLM's family), read through its own processor."""
    import torch

    import tiny_vlms
    from lapa_training.vla import ActionBins, VLAConfig, VLAModel

    root = tmp_path_factory.mktemp("tiny_vlm")
    torch.manual_seed(0)
    model = VLAModel(VLAConfig.vlm(backbone=str(tiny_vlms.build("idefics3", root / "idefics3")), stage="finetune",
                                   objective="action"))
    model.set_action_bins(ActionBins.fit(np.random.default_rng(0).normal(size=(5000, 7)) * 0.005))
    return Path(model.save_pretrained(root / "policy"))


def test_the_server_runs_a_vlm_checkpoint_and_the_arm_moves(ros, test_node, home, tiny_vlm):
    _the_arm_moves_as_the_checkpoint_says(ros, test_node, home, tiny_vlm, "run_demo_vlm_server")


def _the_arm_moves_as_the_checkpoint_says(ros, test_node, home, checkpoint: Path, name: str) -> None:
    start = _tcp(home)
    server = _server(test_node, name, checkpoint)
    try:
        result, feedback = _run_goal(ros, name, instruction="go to the red block", max_steps=15)
        time.sleep(0.2)
        moved = _tcp(home) - start
    finally:
        assert server.stop() == 0, server.output()
    assert result.result.steps == 15 and "max_steps" in result.result.message, result.result.message
    assert [f.step for f in feedback] == list(range(1, 16))
    assert all(f.token_kind == "action" and len(f.tokens) == 7 and len(f.delta) == 7 for f in feedback)
    assert all(0 < f.policy_latency_s < 1.0 for f in feedback)
    assert np.abs(np.array([f.delta for f in feedback])[:, :6]).max() > 0  # the model asked for motion ...
    assert np.linalg.norm(moved[:3]) > 0.01 or np.abs(moved[3:]).max() > 0.01, moved  # ... and the arm moved
    assert "Traceback" not in server.output()


def test_the_server_reads_a_compressed_camera(ros, test_node, home):
    """Raw frames of the simulator, JPEG-compressed by the test (as image_transport's compressed
    republisher would), are the server's only camera; the arm moves as the policy says."""
    import cv2

    topic = "/run_demo/camera/image_raw/compressed"
    pub = test_node.create_publisher(CompressedImage, topic, qos_profile_sensor_data)
    sent = {"n": 0}

    def republish(msg):
        rgb = np.frombuffer(msg.data, np.uint8).reshape(msg.height, msg.width, 3)
        ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        assert ok
        pub.publish(CompressedImage(header=msg.header, format="rgb8; jpeg compressed bgr8", data=jpeg.tobytes()))
        sent["n"] += 1

    sub = test_node.create_subscription(Image, "/camera/image_raw", republish, qos_profile_sensor_data)
    start = _tcp(home)
    server = _server(test_node, "run_demo_compressed_server", ConstantPolicy.save(
        Path(tempfile.mkdtemp()) / "policy", (0.004, 0, 0, 0, 0, 0, 0)),
        image_topic=topic, image_transport="compressed")
    try:
        result, feedback = _run_goal(ros, "run_demo_compressed_server", instruction="move right", max_steps=12)
        time.sleep(0.2)
        moved = _tcp(home)[:3] - start[:3]
    finally:
        test_node.destroy_subscription(sub)
        assert server.stop() == 0, server.output()
    assert sent["n"] > 0
    # a frame the server could not decode, or none arriving, would have aborted the goal early
    assert result.result.steps == 12 and "max_steps" in result.result.message, result.result.message
    assert len(feedback) == 12
    assert moved[0] > 0.015 and abs(moved[1]) < 0.01, moved  # +x at 0.04 m/s for 1.2 s
