"""lapa_policy_server against the simulated arm, over real DDS, each in its own process.

The policy is the constant bring-up policy (fault injection for the failure cases): what is under
test here is the server's contract and its safety behaviour, not a learned policy. The simulated arm
asks for MoveIt Servo's handshake (servo_handshake): it drops every twist until switched to TWIST and
unpaused, and every twist stamped more than 0.1 s ago, through moveit_msgs definitions identical to
upstream's (tools/interfaces/).
"""

from __future__ import annotations

import signal
import threading
import time

import numpy as np
import pytest
from geometry_msgs.msg import PoseStamped, TwistStamped
from rclpy.action import ActionClient
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image

from conftest import Latest, NodeProcess, run_to_exit, wait_for
from lapa_core.policy import ConstantPolicy

SIM = "lapa_policy_node.sim_arm_node"
SERVER = "lapa_policy_node.policy_server_node"
TWIST = "/servo_node/delta_twist_cmds"
STEP = 0.004  # m per 0.1 s step = 0.04 m/s, well inside the default speed clamp


class Twists:
    """Every twist on the servo topic, with arrival times and the publisher that sent it."""

    def __init__(self, node):
        self.node = node
        self.items: list[tuple[float, np.ndarray, bytes]] = []
        self.lock = threading.Lock()
        node.create_subscription(TwistStamped, TWIST, self._on, 50)

    def _on(self, msg, info):
        t = msg.twist
        gid = bytes((info.get("publisher_gid") or {}).get("data", b""))
        with self.lock:
            self.items.append((time.monotonic(), np.array([t.linear.x, t.linear.y, t.linear.z,
                                                           t.angular.x, t.angular.y, t.angular.z]), gid))

    def since(self, t0: float, node_name: str | None = None) -> list[tuple[float, np.ndarray]]:
        """Twists that arrived from t0 on; node_name: only those the (running) node of that name sent,
        for a check on one server's stream that another publisher on the topic must not pass or fail."""
        gids = None
        if node_name is not None:
            gids = {bytes(i.endpoint_gid) for i in self.node.get_publishers_info_by_topic(TWIST)
                    if i.node_name == node_name}
            assert gids, f"{node_name} publishes no twists"
        with self.lock:
            return [(t, v) for t, v, gid in self.items if t >= t0 and (gids is None or gid in gids)]

    def last(self) -> np.ndarray | None:
        with self.lock:
            return self.items[-1][1] if self.items else None


def _paced_steps(arrivals, period):
    """When the control loop's pacer lets it step, for frames arriving at `arrivals` (the policy
    taking no time; a newer frame replaces one that waits for its turn)."""
    from lapa_policy_node.policy_server_node import _StepPacer

    pace, steps, due = _StepPacer(period, arrivals[0]), [], None
    for t in arrivals:
        if due is not None and t >= due:
            pace.spend(due)
            steps.append(due)
            due = None
        if due is None:
            due = t + max(0.0, pace.wait(t))
    return np.array(steps + [due])


def test_steps_follow_frames_at_once_and_never_exceed_the_control_rate():
    period = 0.1
    on_time = np.arange(100) * period
    assert np.allclose(_paced_steps(on_time, period), on_time)  # each frame taken as it arrives
    late = on_time.copy()
    late[[20, 50, 51]] += [0.04, 0.06, 0.03]  # a late frame, followed by on-time ones
    assert np.allclose(_paced_steps(late, period), late)
    fast = np.arange(300) / 30.0  # a 30 Hz camera, a 10 Hz policy
    steps = _paced_steps(fast, period)
    assert abs(len(steps) - 100) <= 2 and np.diff(steps).min() >= 0.5 * period - 1e-9


def test_camera_images_go_through_cv_bridge_when_it_is_there_and_the_builtin_path_otherwise(monkeypatch):
    import sys
    import types

    from lapa_policy_node.policy_server_node import make_converter
    from lapa_policy_node.runtime import ConfigError

    frame = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    msg = Image(height=2, width=3, encoding="bgr8", step=9, data=frame.tobytes())
    lines = []
    monkeypatch.setitem(sys.modules, "cv_bridge", None)  # as here: not importable
    builtin = make_converter("auto", lines.append)
    assert np.array_equal(builtin(msg), frame[..., ::-1]) and "not importable" in lines[-1]
    with pytest.raises(ConfigError, match="cv_bridge is not importable"):
        make_converter("cv_bridge")

    calls = []

    class CvBridge:  # the ROS 2 cv_bridge API the server uses
        def imgmsg_to_cv2(self, m, desired_encoding):
            calls.append(desired_encoding)
            return frame

    monkeypatch.setitem(sys.modules, "cv_bridge", types.SimpleNamespace(CvBridge=CvBridge))
    bridged = make_converter("auto", lines.append)
    assert bridged(msg) is not None and calls == ["rgb8"] and "with cv_bridge" in lines[-1]
    assert np.array_equal(make_converter("builtin", lines.append)(msg), frame[..., ::-1]) and calls == ["rgb8"]


def test_the_log_says_plan_and_execute_is_not_offered_whether_or_not_moveit_py_is_there(monkeypatch):
    import importlib.util

    from lapa_policy_node.policy_server_node import motion_interface_note

    real = importlib.util.find_spec
    assert real("moveit") is None  # as here
    assert "plan-and-execute mode skipped" in motion_interface_note()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "moveit" else real(name, *a))
    assert "plan-and-execute mode is not offered" in motion_interface_note()


@pytest.fixture(scope="module")
def sim(ros):
    proc = NodeProcess(SIM, {"image_width": 48, "image_height": 48, "camera_rate": 20.0, "servo_handshake": True})
    yield proc
    assert proc.stop() == 0, proc.output()


@pytest.fixture(scope="module")
def watch(test_node, sim):
    pose = Latest(test_node, PoseStamped, "/ee_pose")
    image = Latest(test_node, Image, "/camera/image_raw", qos_profile_sensor_data)
    wait_for(lambda: pose.get() is not None and image.get() is not None, 60, what="the sim's EE pose and camera")
    return Twists(test_node), pose


@pytest.fixture(autouse=True)
def home_arm(test_node, watch):
    """Every test starts from the home pose, whatever the previous one did to the arm."""
    from lapa_interfaces.srv import ResetEpisode

    client = test_node.create_client(ResetEpisode, "/lapa_sim_arm/reset")
    assert client.wait_for_service(timeout_sec=20)
    assert _wait(client.call_async(ResetEpisode.Request(task="reach", seed=0))).success
    test_node.destroy_client(client)
    time.sleep(0.2)


def _server(test_node, tmp_path, name="lapa_policy_server", delta=(STEP, 0, 0, 0, 0, 0, 0), policy=None, **params):
    ckpt = ConstantPolicy.save(tmp_path / "policy", delta, **(policy or {}))
    # The sim renders in real time on a loaded 2-core machine and its camera can hiccup past the
    # default 0.25 s watchdog; only the stale-camera test holds the server to the default.
    params.setdefault("camera_timeout", 1.0)
    proc = NodeProcess(SERVER, {"checkpoint": str(ckpt), **params}, extra=["-r", f"__node:={name}"])
    wait_for(lambda: "policy server ready" in proc.output() or proc.proc.poll() is not None, 60,
             what="the policy server")
    assert proc.proc.poll() is None, proc.output()
    assert "plan-and-execute mode skipped" in proc.output()  # moveit_py is not installable here
    if "image_topic" not in params:  # a test with its own camera waits for its first frame itself
        _wait_for_inputs(proc, "first camera frame")
    _wait_for_inputs(proc, "first EE pose")
    return proc


def _wait_for_inputs(proc, line: str) -> None:
    """Discovery is not delivery: on a loaded machine a goal sent once the subscriptions are matched
    can still beat the first message. The server logs the first frame and the first pose it gets."""
    wait_for(lambda: line in proc.output(), 30, what=f"'{line}' in the server log: {proc.output()[-600:]}")


def _client(test_node, name="lapa_policy_server"):
    from lapa_interfaces.action import FollowInstruction

    client = ActionClient(test_node, FollowInstruction, f"/{name}/follow_instruction")
    assert client.wait_for_server(timeout_sec=30)
    return client, FollowInstruction


def _wait(future, timeout=30.0):
    wait_for(future.done, timeout, what="an action future")
    return future.result()


def _send(client, action, feedback=None, sends: list[float] | None = None, **goal):
    """Send a goal; resend if the answer never comes. Right after discovery, DDS may not yet have
    matched the server's reply writer to this client, so the first reply can be lost (the goal then
    runs unanswered and the resent one preempts it, with a zero twist). sends: gets the time of
    each send."""
    for _ in range(3):
        if sends is not None:
            sends.append(time.monotonic())
        future = client.send_goal_async(action.Goal(**goal), feedback_callback=feedback)
        deadline = time.monotonic() + 5.0
        while not future.done() and time.monotonic() < deadline:
            time.sleep(0.01)
        if future.done():
            return future.result()
    pytest.fail("the policy server never answered a goal request")


def _position(pose) -> np.ndarray:
    p = pose.get().pose.position
    return np.array([p.x, p.y, p.z])


def test_a_goal_moves_the_arm_and_reports_every_step(tmp_path, test_node, watch):
    from action_msgs.msg import GoalStatus

    twists, pose = watch
    server = _server(test_node, tmp_path, name="server_move")
    try:
        client, action = _client(test_node, "server_move")
        start = _position(pose)
        feedback = []
        handle = _send(client, action, lambda f: feedback.append(f.feedback), instruction="move right",
                       max_steps=15)
        assert handle.accepted
        result = _wait(handle.get_result_async())
        assert result.status == GoalStatus.STATUS_ABORTED
        assert result.result.steps == 15 and "max_steps" in result.result.message
        assert not result.result.success_known
        moved = _position(pose) - start
        assert moved[0] > 0.02 and abs(moved[1]) < 0.01, moved  # +x at ~0.04 m/s for 1.5 s
        assert [f.step for f in feedback] == list(range(1, 16))
        np.testing.assert_allclose(feedback[0].delta, [STEP, 0, 0, 0, 0, 0, 0], atol=1e-7)
        assert np.allclose(twists.last(), 0)  # the goal ended: the arm was told to stop
    finally:
        server.stop()


def test_twists_go_out_only_after_the_servo_handshake_and_fresh(tmp_path, test_node, watch, sim):
    """The arm moved in the test above only because the server switched Servo to TWIST and unpaused it;
    a twist stamped 1 s ago is dropped, as MoveIt Servo drops it."""
    server = _server(test_node, tmp_path, name="server_handshake")
    try:
        client, action = _client(test_node, "server_handshake")
        _wait(_send(client, action, instruction="move right", max_steps=3).get_result_async())
    finally:
        server.stop()
    log = sim.output()
    assert "servo command type 1: switched" in log and "servo running" in log, log[-2000:]
    stale = TwistStamped()
    stale.header.stamp = (test_node.get_clock().now() - rclpy_duration(1.0)).to_msg()
    stale.header.frame_id = "panda_link0"
    stale.twist.linear.x = 0.05
    publisher = test_node.create_publisher(TwistStamped, TWIST, 10)
    try:
        wait_for(lambda: publisher.get_subscription_count() > 0, 10, what="the sim's twist subscription")
        for _ in range(3):
            publisher.publish(stale)
            time.sleep(0.05)
        wait_for(lambda: "older than incoming_command_timeout" in sim.output(), 10, what="the stale twist dropped")
    finally:
        test_node.destroy_publisher(publisher)


def test_a_servo_halt_ends_the_goal_with_its_reason(tmp_path, test_node, watch):
    from action_msgs.msg import GoalStatus
    from moveit_msgs.msg import ServoStatus

    twists, _ = watch
    server = _server(test_node, tmp_path, name="server_halt")
    status = test_node.create_publisher(ServoStatus, "/servo_node/status", 10)
    try:
        client, action = _client(test_node, "server_halt")
        handle = _send(client, action, instruction="move right", max_steps=1000)
        wait_for(lambda: twists.last() is not None and twists.last()[0] > 0.01, 10, what="motion")
        status.publish(ServoStatus(code=ServoStatus.HALT_FOR_COLLISION, message="close to the table"))
        result = _wait(handle.get_result_async())
        assert result.status == GoalStatus.STATUS_ABORTED
        assert "MoveIt Servo halted for collision: close to the table" in result.result.message, result.result
        assert np.allclose(twists.last(), 0)
    finally:
        test_node.destroy_publisher(status)
        server.stop()


def test_a_servo_that_refuses_twist_mode_ends_the_goal_before_any_twist(tmp_path, test_node, watch):
    from action_msgs.msg import GoalStatus
    from moveit_msgs.srv import ServoCommandType

    def refuse(request, response):
        response.success = False
        return response

    service = test_node.create_service(ServoCommandType, "/stubborn_servo/switch_command_type", refuse)
    twists, _ = watch
    server = _server(test_node, tmp_path, name="server_refused", servo_node="/stubborn_servo")
    try:
        client, action = _client(test_node, "server_refused")
        t0 = time.monotonic()
        result = _wait(_send(client, action, instruction="move right", max_steps=20).get_result_async())
        assert result.status == GoalStatus.STATUS_ABORTED
        assert "MoveIt Servo refused to switch to twist commands" in result.result.message, result.result
        assert all(np.allclose(v, 0) for _, v in twists.since(t0))  # not one moving twist
    finally:
        server.stop()
        test_node.destroy_service(service)


def test_the_gripper_through_a_gripper_command_action(tmp_path, test_node, watch):
    """A stand-in for ros2_control's GripperActionController: the policy's closure 1 becomes one goal at the
    closed position with the configured max effort, not a goal per step."""
    from control_msgs.action import GripperCommand
    from rclpy.action import ActionServer

    goals = []

    def execute(handle):
        goals.append((handle.request.command.position, handle.request.command.max_effort))
        handle.succeed()
        return GripperCommand.Result(position=handle.request.command.position, reached_goal=True)

    controller = ActionServer(test_node, GripperCommand, "/stand_in_gripper/gripper_cmd", execute)
    server = _server(test_node, tmp_path, name="server_gripper", delta=(STEP, 0, 0, 0, 0, 0, 1.0),
                     gripper_mode="action", gripper_topic="/stand_in_gripper/gripper_cmd",
                     gripper_open_position=0.04, gripper_closed_position=0.0, gripper_max_effort=35.0)
    try:
        client, action = _client(test_node, "server_gripper")
        result = _wait(_send(client, action, instruction="close the hand", max_steps=8).get_result_async())
        assert result.result.steps == 8, result.result
        wait_for(lambda: goals, 10, what="a GripperCommand goal")
        assert goals == [(0.0, 35.0)]
    finally:
        server.stop()
        controller.destroy()


def test_diagnostics_say_when_the_policy_is_slower_than_the_control_period(tmp_path, test_node, watch):
    """/diagnostics at 1 Hz: camera rate and age, act() latency against the control period (WARN above it),
    Servo status, goal state and the checkpoint."""
    from diagnostic_msgs.msg import DiagnosticArray

    arrays = []
    sub = test_node.create_subscription(DiagnosticArray, "/diagnostics", arrays.append, 50)
    server = _server(test_node, tmp_path, name="server_diag", policy={"seconds_per_step": 0.15})
    try:
        client, action = _client(test_node, "server_diag")
        _wait(_send(client, action, instruction="slowly", max_steps=4).get_result_async())

        def status(name):
            for array in reversed(arrays):
                for s in array.status:
                    if s.name == f"server_diag: {name}" and s.hardware_id == "/server_diag":
                        return s
            return None

        wait_for(lambda: status("policy") is not None and
                 int({kv.key: kv.value for kv in status("policy").values}["steps"]) >= 4, 10,
                 what="diagnostics after the goal")
        policy = status("policy")
        values = {kv.key: kv.value for kv in policy.values}
        assert policy.level == bytes([1]) and "exceeds the control period 100 ms" in policy.message, policy
        assert float(values["latency_p50_ms"]) >= 150 and str(tmp_path / "policy") in values["checkpoint"]
        camera = {kv.key: kv.value for kv in status("camera").values}
        assert float(camera["rate_hz"]) > 5 and status("camera").level == bytes([0])
        assert "slowly" in status("goal").message or "idle" in status("goal").message
        assert status("MoveIt Servo").message == "moving" or status("MoveIt Servo").level == bytes([0])
    finally:
        test_node.destroy_subscription(sub)
        server.stop()


def test_the_managed_server_follows_its_lifecycle(tmp_path, test_node, watch):
    """autostart false: configure fails on a bad checkpoint and succeeds once it is fixed; inactive rejects
    goals; activate accepts them; deactivate ends the goal with a zero twist; cleanup frees the model."""
    from action_msgs.msg import GoalStatus
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState, GetState
    from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
    from rcl_interfaces.srv import SetParameters

    twists, _ = watch
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text('{"policy_type": "constant", "delta": [0, 0, 0, 0, 0, 0, 0], "control_rate": 0}')
    good = ConstantPolicy.save(tmp_path / "good", (STEP, 0, 0, 0, 0, 0, 0))
    name = "server_managed"
    server = NodeProcess(SERVER, {"checkpoint": str(bad), "autostart": "false", "camera_timeout": 1.0},
                         extra=["-r", f"__node:={name}"])
    change = test_node.create_client(ChangeState, f"/{name}/change_state")
    get = test_node.create_client(GetState, f"/{name}/get_state")
    setter = test_node.create_client(SetParameters, f"/{name}/set_parameters")
    try:
        wait_for(lambda: "waiting for the configure transition" in server.output() or server.proc.poll() is not None,
                 60, what="the managed server")
        assert change.wait_for_service(timeout_sec=20) and get.wait_for_service(timeout_sec=20)

        def transition(tid):
            return _wait(change.call_async(ChangeState.Request(transition=Transition(id=tid)))).success

        def state():
            return _wait(get.call_async(GetState.Request())).current_state.label

        assert state() == "unconfigured"
        assert not transition(Transition.TRANSITION_CONFIGURE)  # the checkpoint's control_rate is 0
        assert "configure failed: parameter 'checkpoint'" in server.output() and state() == "unconfigured"
        value = ParameterValue(type=ParameterType.PARAMETER_STRING, string_value=str(good))
        assert _wait(setter.call_async(SetParameters.Request(
            parameters=[Parameter(name="checkpoint", value=value)]))).results[0].successful
        assert transition(Transition.TRANSITION_CONFIGURE) and state() == "inactive"

        client, action = _client(test_node, name)
        assert not _wait(client.send_goal_async(action.Goal(instruction="move right"))).accepted  # inactive
        assert transition(Transition.TRANSITION_ACTIVATE) and state() == "active"
        _wait_for_inputs(server, "first EE pose")
        handle = _send(client, action, instruction="move right", max_steps=1000)
        wait_for(lambda: twists.last() is not None and twists.last()[0] > 0.001, 10, what="motion")
        t_off = time.monotonic()
        assert transition(Transition.TRANSITION_DEACTIVATE) and state() == "inactive"
        result = _wait(handle.get_result_async())
        assert result.status == GoalStatus.STATUS_ABORTED and "server deactivated" in result.result.message
        after = twists.since(t_off)
        assert after and np.allclose(after[0][1], 0) and np.allclose(twists.last(), 0)
        assert not _wait(client.send_goal_async(action.Goal(instruction="move right"))).accepted
        assert transition(Transition.TRANSITION_CLEANUP) and state() == "unconfigured"
        assert "cleaned up: the model is freed" in server.output()
    finally:
        for c in (change, get, setter):
            test_node.destroy_client(c)
        assert server.stop() == 0, server.output()


def rclpy_duration(seconds: float):
    from rclpy.duration import Duration

    return Duration(nanoseconds=int(seconds * 1e9))


def test_cancel_stops_the_arm_at_once_and_a_new_goal_preempts(tmp_path, test_node, watch):
    from action_msgs.msg import GoalStatus

    twists, _ = watch
    server = _server(test_node, tmp_path, name="server_cancel", delta=(0, STEP, 0, 0, 0, 0, 0))
    try:
        client, action = _client(test_node, "server_cancel")
        handle = _send(client, action, instruction="slide left", max_steps=1000)
        wait_for(lambda: twists.last() is not None and twists.last()[1] > 0.01, 10, what="motion")
        t_cancel = time.monotonic()
        _wait(handle.cancel_goal_async())
        after = twists.since(t_cancel)
        assert after and np.allclose(after[0][1], 0), "the first twist after cancel must be zero"
        assert after[0][0] - t_cancel < 0.1
        assert _wait(handle.get_result_async()).status == GoalStatus.STATUS_CANCELED
        time.sleep(0.3)
        assert all(np.allclose(v, 0) for _, v in twists.since(t_cancel))  # and it stays stopped

        first = _send(client, action, instruction="one", max_steps=1000)
        wait_for(lambda: twists.last() is not None and twists.last()[1] > 0.01, 10, what="motion")
        second = _send(client, action, instruction="two", max_steps=5)
        old = _wait(first.get_result_async())
        assert old.status == GoalStatus.STATUS_ABORTED and "preempted" in old.result.message
        new = _wait(second.get_result_async())
        assert new.result.steps == 5

        # goals back to back: each preempts the one before, whether or not that one has begun; only
        # the last one moves on, and the server's log shows one goal running at a time
        sent = [client.send_goal_async(action.Goal(instruction=f"burst {i}", max_steps=3)) for i in range(3)]
        burst = [_wait(f) for f in sent]
        assert all(h.accepted for h in burst)
        results = [_wait(h.get_result_async()) for h in burst]
        assert results[-1].result.steps == 3, results[-1].result.message
        for r in results[:-1]:
            assert r.status == GoalStatus.STATUS_ABORTED and "preempted" in r.result.message
        log = [line for line in server.output().splitlines() if "burst" in line]
        starts = [i for i, line in enumerate(log) if "goal: 'burst" in line]
        ends = [i for i, line in enumerate(log) if "ended after" in line or "preempted before" in line]
        assert all(e < s for s, e in zip(starts[1:], ends)), log  # each ends before the next one starts

        # twenty at once (rclpy's goal service queue holds 10 by default): every one is answered
        sent = [client.send_goal_async(action.Goal(instruction=f"flood {i}", max_steps=2)) for i in range(20)]
        answered = [_wait(f, 60) for f in sent]
        assert all(h.accepted for h in answered)
        assert _wait(answered[-1].get_result_async(), 60).result.steps == 2

        rejected = _wait(client.send_goal_async(action.Goal(instruction="   ")))
        assert not rejected.accepted
        wait_for(lambda: "rejected a goal with an empty instruction" in server.output(), 5, what="the reason")
    finally:
        server.stop()


def test_a_slow_chunked_policy_still_commands_the_arm_at_the_control_rate(tmp_path, test_node, watch):
    from action_msgs.msg import GoalStatus

    twists, _ = watch
    # each prediction takes 2.5 control periods; a chunk of 8 steps spans that twice over
    name, accel, period = "server_chunks", 0.5, 0.1
    # the workspace box far away: near a wall it cuts the speed at once, as it must, whatever the acceleration
    server = _server(test_node, tmp_path, name=name, delta=(0, 0.008, 0, 0, 0, 0, 0),
                     policy={"chunk_size": 8, "seconds_per_step": 0.25}, max_linear_accel=accel,
                     workspace_min="[-2.0, -2.0, -2.0]", workspace_max="[2.0, 2.0, 2.0]")
    try:
        assert "chunks of 8 steps predicted ahead" in server.output()
        client, action = _client(test_node, name)
        latencies, sends = [], []
        t0 = time.monotonic()
        handle = _send(client, action, feedback=lambda f: latencies.append(f.feedback.policy_latency_s),
                       sends=sends, instruction="slide left", max_steps=25)
        result = _wait(handle.get_result_async())
        assert result.result.steps == 25 and "max_steps" in result.result.message, result.result.message
        time.sleep(0.2)
        own = twists.since(t0, node_name=name)
        others = len(twists.since(t0)) - len(own)
        if len(sends) > 1:  # a lost answer: the goal ran, went again, and ended or was preempted (a zero twist)
            last_moving = max(i for i, (_, v) in enumerate(own) if v[1] > 1e-6)
            own = own[max((i for i, (_, v) in enumerate(own[:last_moving]) if np.allclose(v, 0)), default=-1) + 1:]
        sent = np.array([v for _, v in own])
        moving = np.array([t for t, v in own if v[1] > 1e-6])
        assert min(latencies) >= 0.25  # every step came from a prediction that took 2.5 periods ...
        assert np.median(np.diff(moving)) < 0.5 * 0.25  # ... yet twists came at the control rate
        assert len(moving) >= 25
        # smooth while it runs: every change within the acceleration limit, from the first moving twist to
        # the last (the stop that ends the goal is a zero twist at once, not rate-limited)
        live = np.flatnonzero(np.abs(sent[:, 1]) > 1e-6)
        change = np.linalg.norm(np.diff(sent[live[0]:live[-1] + 1, :3], axis=0), axis=1)
        assert change.max() <= accel * period + 1e-9, (sent[:, 1], f"{others} twists from other publishers, "
                                                                   f"{len(sends)} goal sends")
        assert np.allclose(sent[-1], 0)

        # cancelled while a prediction runs: stopped at once, and the late prediction never moves the arm
        handle = _send(client, action, instruction="slide left", max_steps=1000)
        wait_for(lambda: twists.last() is not None and twists.last()[1] > 0.01, 10, what="motion")
        t_cancel = time.monotonic()
        _wait(handle.cancel_goal_async())
        after = twists.since(t_cancel)
        assert after and np.allclose(after[0][1], 0) and after[0][0] - t_cancel < period
        assert _wait(handle.get_result_async()).status == GoalStatus.STATUS_CANCELED
        time.sleep(0.6)  # longer than a prediction
        assert all(np.allclose(v, 0) for _, v in twists.since(t_cancel))
        again = _wait(_send(client, action, instruction="slide left", max_steps=3).get_result_async())
        assert again.result.steps == 3
    finally:
        server.stop()
    assert "Traceback" not in server.output()


def test_the_instruction_topic_starts_and_stops_a_goal(tmp_path, test_node, watch):
    import json

    from rclpy.qos import DurabilityPolicy, QoSProfile
    from std_msgs.msg import String

    twists, _ = watch
    name = "server_topic"
    server = _server(test_node, tmp_path, name=name, delta=(0, STEP, 0, 0, 0, 0, 0))
    status = Latest(test_node, String, f"/{name}/status", QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL))
    say = test_node.create_publisher(String, f"/{name}/instruction", 10)
    try:
        wait_for(lambda: test_node.count_subscribers(f"/{name}/instruction") > 0, 20, what="the instruction topic")
        say.publish(String(data="slide left"))
        wait_for(lambda: twists.last() is not None and twists.last()[1] > 0.01, 20,
                 what=f"motion from a topic instruction (server log: {server.output()[-600:]})")
        # the latched status reaches this subscription once discovery has matched it, maybe after the motion
        wait_for(lambda: status.get() is not None and json.loads(status.get().data)["state"] == "running", 10,
                 what="the running status")
        assert json.loads(status.get().data)["instruction"] == "slide left"
        t_stop = time.monotonic()
        say.publish(String(data=""))
        wait_for(lambda: status.get() is not None and json.loads(status.get().data)["state"] == "idle", 10,
                 what="the server to go idle")
        assert "empty instruction" in json.loads(status.get().data)["last_stop_reason"]
        stops = [t for t, v in twists.since(t_stop) if np.allclose(v, 0)]
        assert stops, "an empty instruction must stop the arm"
        time.sleep(0.3)
        assert all(np.allclose(v, 0) for t, v in twists.since(stops[0]))
    finally:
        test_node.destroy_publisher(say)
        server.stop()


def test_stale_camera_stops_the_arm_within_a_control_period(tmp_path, test_node, watch):
    from action_msgs.msg import GoalStatus

    twists, _ = watch
    cam = test_node.create_publisher(Image, "/test/stalling_camera", 10)
    server = _server(test_node, tmp_path, name="server_stale", image_topic="/test/stalling_camera",
                     camera_timeout=0.25)
    streaming = threading.Event()
    streaming.set()

    def stream():
        img = Image(height=8, width=8, encoding="rgb8", step=24, data=bytes(8 * 8 * 3))
        while streaming.is_set():
            cam.publish(img)
            time.sleep(0.03)

    thread = threading.Thread(target=stream, daemon=True)
    thread.start()
    try:
        _wait_for_inputs(server, "first camera frame")
        client, action = _client(test_node, "server_stale")
        handle = _send(client, action, instruction="go", max_steps=1000)
        wait_for(lambda: twists.last() is not None and twists.last()[0] > 0.01, 10,
                 what=f"motion (server log: {server.output()[-600:]})")
        streaming.clear()
        t_stall = time.monotonic()
        result = _wait(handle.get_result_async())
        assert result.status == GoalStatus.STATUS_ABORTED and "camera stale" in result.result.message
        stops = [t for t, v in twists.since(t_stall) if np.allclose(v, 0)]
        assert stops and stops[0] - t_stall < 0.25 + 0.1 + 0.1  # timeout + one period + delivery
        assert all(np.allclose(v, 0) for t, v in twists.since(stops[0]))
    finally:
        streaming.clear()
        server.stop()


@pytest.mark.parametrize("fault, reason", [({"raise_at_step": 3}, "policy error"),
                                           ({"nan_at_step": 3}, "unsafe policy output")])
def test_policy_failure_stops_the_arm_aborts_and_the_server_lives_on(tmp_path, test_node, watch, fault, reason):
    from action_msgs.msg import GoalStatus

    twists, _ = watch
    name = f"server_{next(iter(fault))}"  # a fresh node name: never a client matched to an old server
    server = _server(test_node, tmp_path, name=name, policy=fault)
    try:
        client, action = _client(test_node, name)
        result = _wait(_send(client, action, instruction="go", max_steps=50).get_result_async())
        assert result.status == GoalStatus.STATUS_ABORTED and reason in result.result.message
        assert result.result.steps == 2
        assert np.allclose(twists.last(), 0)
        again = _wait(_send(client, action, instruction="go again", max_steps=2).get_result_async())
        assert again.result.steps == 2 and "max_steps" in again.result.message  # the step counter reset
    finally:
        server.stop()
    assert "Traceback" not in server.output()


def test_workspace_box_holds_the_tcp_inside(tmp_path, test_node, watch):
    twists, pose = watch
    z0 = _position(pose)[2]
    floor = z0 - 0.03
    server = _server(test_node, tmp_path, name="server_box", delta=(0, 0, -0.01, 0, 0, 0, 0),
                     workspace_min=f"[0.0, -1.0, {floor}]", workspace_max="[1.0, 1.0, 1.0]")
    try:
        client, action = _client(test_node, "server_box")
        _wait(_send(client, action, instruction="press down", max_steps=30).get_result_async())
        time.sleep(0.3)
        assert _position(pose)[2] > floor - 0.01, (z0, floor, _position(pose))
        assert _position(pose)[2] < z0 - 0.015  # it did move down towards the floor
    finally:
        server.stop()


def test_shutdown_sends_a_final_zero_twist(tmp_path, test_node, watch):
    twists, _ = watch
    server = _server(test_node, tmp_path, name="server_sigterm")
    client, action = _client(test_node, "server_sigterm")
    _send(client, action, instruction="go", max_steps=1000)
    wait_for(lambda: twists.last() is not None and twists.last()[0] > 0.01, 10, what="motion")
    t = time.monotonic()
    assert server.stop(signal.SIGTERM) == 0, server.output()
    wait_for(lambda: any(np.allclose(v, 0) for _, v in twists.since(t)), 5, what="the final zero twist")
    assert np.allclose(twists.last(), 0)


@pytest.mark.parametrize("params, message", [
    ({"checkpoint": "/nonexistent/ckpt"}, "parameter 'checkpoint': checkpoint not found: /nonexistent/ckpt"),
    ({"checkpoint": "''"}, "parameter 'checkpoint' is empty"),
    ({"checkpoint": ""}, "error: invalid ROS arguments"),  # '-p checkpoint:=' is malformed for rcl
    ({"checkpoint": "/tmp", "image_transport": "carrier-pigeon"}, "parameter 'image_transport'"),
])
def test_bad_server_parameters_exit_with_a_clear_error(ros, params, message):
    code, output = run_to_exit(SERVER, params)
    assert code == 2 and message in output and "Traceback" not in output, output


@pytest.mark.parametrize("config, message", [
    (b"\xff\xfe\x80", "UnicodeDecodeError"),
    (b"[1, 2]", "expected a JSON object"),
    (b'{"policy_type": "constant", "delta": ["a", "b", "c", "d", "e", "f", "g"]}', "'delta' needs 7 finite numbers"),
    (b'{"policy_type": "constant", "delta": [0, 0, 0, 0, 0, 0, 0], "control_rate": 0}',
     "'control_rate' must be a number > 0"),
])
def test_a_bad_checkpoint_stops_the_server_with_one_line(ros, tmp_path, config, message):
    (tmp_path / "config.json").write_bytes(config)
    code, output = run_to_exit(SERVER, {"checkpoint": str(tmp_path)})
    assert code == 2 and "parameter 'checkpoint'" in output and message in output, output
    assert "Traceback" not in output, output
