"""The lapa_sim_arm node over real DDS: a separate process, driven by a test node."""

from __future__ import annotations

import json
import signal
import time

import numpy as np
import pytest
from geometry_msgs.msg import PoseStamped, TwistStamped
from rclpy.qos import DurabilityPolicy, QoSProfile, qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, Image, JointState
from std_msgs.msg import Float64, String

from conftest import Latest, NodeProcess, run_to_exit, wait_for

SIM = "lapa_policy_node.sim_arm_node"
PARAMS = {"image_width": 96, "image_height": 72, "camera_rate": 15.0, "twist_topic": "/test/servo/delta_twist_cmds"}


def _position(pose: PoseStamped) -> np.ndarray:
    p = pose.pose.position
    return np.array([p.x, p.y, p.z])


@pytest.fixture(scope="module")
def sim(test_node):
    proc = NodeProcess(SIM, PARAMS)
    pose = Latest(test_node, PoseStamped, "/ee_pose")
    try:
        wait_for(lambda: pose.get() is not None or proc.proc.poll() is not None, 60, what="the sim's first EE pose")
        assert proc.proc.poll() is None, proc.output()
        yield proc, pose
    finally:
        code = proc.stop()
        assert code == 0, f"sim exited with {code}:\n{proc.output()}"


@pytest.fixture(scope="module")
def twist_pub(test_node, sim):
    pub = test_node.create_publisher(TwistStamped, PARAMS["twist_topic"], 10)
    wait_for(lambda: pub.get_subscription_count() > 0, 20, what="the sim to subscribe to twists")
    return pub


def _send(pub, node, v, seconds, rate=20.0, frame="panda_link0"):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        msg = TwistStamped()
        msg.header.stamp = node.get_clock().now().to_msg()
        msg.header.frame_id = frame
        msg.twist.linear.x, msg.twist.linear.y, msg.twist.linear.z = v[:3]
        msg.twist.angular.x, msg.twist.angular.y, msg.twist.angular.z = v[3:]
        pub.publish(msg)
        time.sleep(1.0 / rate)


def _settle(pose, seconds=0.4):
    time.sleep(seconds)
    return _position(pose.get())


def test_twist_moves_the_end_effector_the_commanded_way(sim, twist_pub, test_node):
    _, pose = sim
    start = _settle(pose)
    _send(twist_pub, test_node, [0.06, 0, 0, 0, 0, 0], 1.0)
    after_x = _settle(pose)
    assert after_x[0] - start[0] > 0.03, (start, after_x)
    assert np.all(np.abs((after_x - start)[1:]) < 0.01)

    _send(twist_pub, test_node, [0, -0.06, 0, 0, 0, 0], 1.0)
    after_y = _settle(pose)
    assert start[1] - after_y[1] > 0.03
    assert abs(after_y[0] - after_x[0]) < 0.01


def test_twist_in_the_tcp_frame_is_rotated_into_the_base_frame(sim, twist_pub, test_node):
    _, pose = sim
    start = _settle(pose)
    # The TCP's z axis points down at the table: +z in the TCP frame is -z in the base frame.
    _send(twist_pub, test_node, [0, 0, 0.05, 0, 0, 0], 0.8, frame="panda_hand_tcp")
    after = _settle(pose)
    assert start[2] - after[2] > 0.02, (start, after)


def test_stale_commands_stop_the_arm(sim, twist_pub, test_node):
    _, pose = sim
    _send(twist_pub, test_node, [0, 0.05, 0, 0, 0, 0], 0.6)
    time.sleep(0.35)  # the sim's command_timeout is 0.25 s
    halted = _position(pose.get())
    time.sleep(1.0)
    assert np.linalg.norm(_position(pose.get()) - halted) < 0.003


def test_twists_in_unknown_frames_are_ignored(sim, twist_pub, test_node):
    proc, pose = sim
    start = _settle(pose, 0.5)
    _send(twist_pub, test_node, [0.08, 0, 0, 0, 0, 0], 0.6, frame="some_other_frame")
    assert np.linalg.norm(_settle(pose) - start) < 0.003
    wait_for(lambda: "unknown frame 'some_other_frame'" in proc.output(), 5, what="a warning in the sim's log")


def test_camera_images_and_info_are_well_formed(sim, test_node):
    image = Latest(test_node, Image, "/camera/image_raw", qos_profile_sensor_data)
    info = Latest(test_node, CameraInfo, "/camera/camera_info", qos_profile_sensor_data)
    wait_for(lambda: image.count >= 3 and info.get() is not None, 20, what="camera frames")
    msg = image.get()
    assert (msg.encoding, msg.height, msg.width, msg.step) == ("rgb8", 72, 96, 96 * 3)
    assert msg.header.frame_id == "front_camera_optical_frame"
    assert msg.header.stamp.sec > 0
    pixels = np.frombuffer(bytes(msg.data), np.uint8).reshape(72, 96, 3)
    assert pixels.std() > 10
    cam = info.get()
    assert (cam.width, cam.height) == (96, 72) and cam.k[0] > 0 and cam.k[2] == 48.0


def test_joint_states_name_every_urdf_joint(sim, test_node):
    js = Latest(test_node, JointState, "/joint_states")
    wait_for(lambda: js.get() is not None, 10, what="joint states")
    msg = js.get()
    assert msg.name[:7] == [f"panda_joint{i}" for i in range(1, 8)]
    assert len(msg.position) == len(msg.name) == 9


def test_gripper_command_closes_the_gripper(sim, test_node):
    js = Latest(test_node, JointState, "/joint_states")
    pub = test_node.create_publisher(Float64, "/gripper/command", 10)
    wait_for(lambda: pub.get_subscription_count() > 0, 10, what="the gripper subscription")
    pub.publish(Float64(data=0.0))
    wait_for(lambda: js.get() is not None and js.get().position[7] < 0.005, 10, what="the fingers to close")
    pub.publish(Float64(data=1.0))
    wait_for(lambda: js.get().position[7] > 0.035, 10, what="the fingers to open")


def test_reset_service_selects_task_and_seed(sim, test_node):
    from lapa_interfaces.srv import ResetEpisode

    client = test_node.create_client(ResetEpisode, "/lapa_sim_arm/reset")
    assert client.wait_for_service(timeout_sec=20)
    latched = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL)
    episode = Latest(test_node, String, "/lapa_sim_arm/episode", latched)

    response = client.call(ResetEpisode.Request(task="pick_place", seed=42, instruction_set="train"), timeout_sec=20)
    assert response.success, response.message
    from lapa_sim.tasks import sample_episode

    assert response.instruction == sample_episode("pick_place", 42).instruction
    wait_for(lambda: episode.get() and json.loads(episode.get().data)["seed"] == 42, 10, what="the episode topic")
    assert json.loads(episode.get().data)["task"] == "pick_place"

    bad = client.call(ResetEpisode.Request(task="juggle", seed=1), timeout_sec=20)
    assert not bad.success and "unknown task 'juggle'" in bad.message


@pytest.mark.parametrize("params, message", [
    ({"task": "juggle"}, "parameter 'task': unknown task 'juggle'"),
    ({"twist_topic": "'bad topic!'"}, "parameter 'twist_topic': 'bad topic!' is not a valid ROS topic name"),
    ({"seed": "abc"}, "parameter 'seed' has the wrong type"),
    ({"camera_rate": 0.0}, "parameter 'camera_rate': must lie in [1.0, 1000.0]"),
])
def test_bad_parameters_exit_with_a_clear_error(ros, params, message):
    code, output = run_to_exit(SIM, params)
    assert code == 2, output
    assert message in output, output
    assert "Traceback" not in output


def test_sigterm_shuts_the_node_down_cleanly(ros):
    proc = NodeProcess(SIM, {"image_width": 32, "image_height": 32})
    wait_for(lambda: "simulated arm ready" in proc.output() or proc.proc.poll() is not None, 60, what="start-up")
    assert proc.stop(signal.SIGTERM) == 0, proc.output()
    assert "SIGTERM received" in proc.output() and "Traceback" not in proc.output()
