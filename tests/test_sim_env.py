"""The simulator in-process: description, servo behaviour, tasks, and the scripted expert."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import numpy as np
import pytest

from lapa_sim import scene, tasks
from lapa_sim.env import TabletopEnv
from lapa_sim.expert import ScriptedExpert
from lapa_sim.rollout import run_episode


@pytest.fixture(scope="module")
def env():
    e = TabletopEnv(image_size=(64, 80))
    yield e
    e.close()


def test_simulator_reads_the_urdf_that_robot_state_publisher_reads(env):
    robot = ET.parse(scene.URDF_PATH).getroot()
    urdf_joints = {j.get("name"): j for j in robot.iter("joint") if j.get("type") != "fixed"}
    assert set(urdf_joints) == set(scene.ARM_JOINTS + scene.FINGER_JOINTS)
    for name, joint in urdf_joints.items():
        limit = joint.find("limit")
        lo, hi = env.model.joint(name).range
        assert lo == pytest.approx(float(limit.get("lower"))), name
        assert hi == pytest.approx(float(limit.get("upper"))), name
    # the TCP sits where the URDF's fixed joints put it: 0.107 + 0.1034 below the flange axis
    obs = env.reset("reach", 0)
    flange = env.data.body("panda_link7").xpos
    assert np.linalg.norm(obs.tcp_pos - flange) == pytest.approx(0.107 + 0.1034, abs=1e-6)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_twist_moves_the_tcp_along_the_commanded_axis(env, axis):
    obs0 = env.reset("reach", 1)
    twist = np.zeros(6)
    twist[axis] = -0.05 if axis == 2 else 0.05  # down for z, so we stay above the table
    for _ in range(10):
        obs = env.step(twist, 1.0, 0.1)  # 1 s at 5 cm/s
    moved = obs.tcp_pos - obs0.tcp_pos
    assert abs(moved[axis]) == pytest.approx(0.05, abs=0.01)
    assert np.sign(moved[axis]) == np.sign(twist[axis])
    off_axis = np.delete(moved, axis)
    assert np.all(np.abs(off_axis) < 0.005), moved
    angle = np.degrees(2 * np.arccos(min(1.0, abs(np.dot(obs.tcp_quat, obs0.tcp_quat)))))
    assert angle < 2.0


def test_angular_twist_turns_the_hand_about_the_base_z_axis(env):
    obs0 = env.reset("reach", 2)
    for _ in range(10):
        obs = env.step(np.array([0, 0, 0, 0, 0, 0.3]), 1.0, 0.1)
    assert obs.tcp_rpy[2] - obs0.tcp_rpy[2] == pytest.approx(0.3, abs=0.05)
    assert np.linalg.norm(obs.tcp_pos - obs0.tcp_pos) < 0.005


def test_servo_halts_when_commands_go_stale(env):
    env.reset("reach", 3)
    env.command(np.array([0.1, 0, 0, 0, 0, 0]))
    env.advance(0.2)  # still fresh: moving
    assert env.servo.is_moving
    env.advance(0.3)  # past the 0.25 s timeout
    assert env.servo.halted_reason == "stale command"
    stopped = env.observe().tcp_pos
    env.advance(1.0)
    assert np.linalg.norm(env.observe().tcp_pos - stopped) < 0.002


def test_speed_is_limited_and_nan_commands_are_refused(env):
    obs0 = env.reset("reach", 4)
    obs = env.step(np.array([0, 0, -5.0, 0, 0, 0]), 1.0, 0.2)  # 5 m/s asked; limit 0.25 m/s
    assert obs0.tcp_pos[2] - obs.tcp_pos[2] < 0.25 * 0.2 + 0.01
    with pytest.raises(ValueError, match="NaN"):
        env.command(np.array([np.nan, 0, 0, 0, 0, 0]))


def test_servo_halts_at_joint_limits_instead_of_crossing_them(env):
    env.reset("reach", 5)
    for _ in range(60):  # drive far up and back: the elbow runs into its limit
        env.step(np.array([-0.25, 0, 0.25, 0, 0, 0]), 1.0, 0.1)
    assert env.servo.halted_reason.startswith("joint limit")
    q = env.observe().joint_pos[:7]
    assert np.all(q >= env.servo.q_low - 1e-3) and np.all(q <= env.servo.q_high + 1e-3)


def test_layouts_are_seeded_and_reproducible():
    a = tasks.sample_episode("pick_place", 7)
    b = tasks.sample_episode("pick_place", 7)
    c = tasks.sample_episode("pick_place", 8)
    assert a.instruction == b.instruction and np.array_equal(a.block_xy, b.block_xy)
    assert not np.array_equal(a.block_xy, c.block_xy)
    assert len(set(a.block_colors)) == scene.N_BLOCKS and a.pad_color not in a.block_colors
    para = tasks.sample_episode("pick_place", 7, instruction_set="paraphrase")
    assert para.instruction not in [t.format(color=a.color, target=a.pad_color, direction="")
                                    for t in tasks.INSTRUCTIONS["pick_place"]["train"]]


@pytest.mark.parametrize("task", tasks.TASKS)
def test_held_out_combinations_split_seeds_into_seen_and_unseen(task):
    seen = tasks.episode_seeds(task, 1000, 40, "seen")
    unseen = tasks.episode_seeds(task, 1000, 8, "unseen")
    assert len(seen) == 40 and len(unseen) == 8 and not set(seen) & set(unseen)
    assert all(tasks.sample_episode(task, s).color != tasks.HELD_OUT_TARGETS[task] for s in seen)
    assert all(tasks.sample_episode(task, s).color == tasks.HELD_OUT_TARGETS[task] for s in unseen)
    everything = tasks.episode_seeds(task, 1000, 60, "all")
    assert everything == list(range(1000, 1060)) and set(seen[:10]) <= set(everything)
    # the held-out colour still shows up in seen episodes, as a distractor block
    assert any(tasks.HELD_OUT_TARGETS[task] in tasks.sample_episode(task, s).block_colors for s in seen)
    with pytest.raises(ValueError, match="combinations"):
        tasks.episode_seeds(task, 0, 1, "novel")


def test_unknown_task_and_instruction_set_are_clear_errors():
    with pytest.raises(tasks.UnknownTaskError, match="unknown task 'fly'.*reach, push, pick_place"):
        tasks.sample_episode("fly", 0)
    with pytest.raises(ValueError, match="instruction_set"):
        tasks.sample_episode("reach", 0, instruction_set="klingon")


def test_success_check_is_false_at_the_start_of_every_episode(env):
    for task in tasks.TASKS:
        for seed in range(5):
            assert not env.reset(task, seed).success, (task, seed)


@pytest.mark.parametrize("task", tasks.TASKS)
def test_scripted_expert_solves_at_least_90_percent_of_seeded_episodes(env, task):
    n, wins = 20, 0
    for seed in range(500, 500 + n):
        experts = []

        def factory(ep):
            experts.append(ScriptedExpert(ep, noise=0.02, seed=seed))
            return experts[-1].act

        wins += run_episode(env, factory, task, seed, done=lambda: experts[-1].done).success
    assert wins / n >= 0.9, f"{task}: expert solved {wins}/{n}"


def test_a_controller_that_does_nothing_fails_every_task(env):
    for task in tasks.TASKS:
        result = run_episode(env, lambda ep: (lambda obs: (np.zeros(6), 1.0)), task, 0, max_seconds=2.0)
        assert not result.success


def test_rendered_frames_have_the_configured_shape_and_show_the_scene(env):
    env.reset("reach", 0)
    img = env.render()
    assert img.shape == (64, 80, 3) and img.dtype == np.uint8
    assert img.std() > 10  # not a blank frame
    env.step(np.array([0, 0.2, 0, 0, 0, 0]), 1.0, 0.5)
    assert np.abs(env.render().astype(int) - img).mean() > 0.5  # the arm moved in view


@pytest.mark.parametrize("embodiment", ["panda", "floating_gripper"])
def test_each_episode_starts_the_tcp_at_its_own_seeded_point_pointing_down(embodiment):
    env = TabletopEnv(image_size=(32, 32), embodiment=embodiment)
    try:
        starts = []
        for seed in range(12):
            obs = env.reset(tasks.TASKS[seed % 3], seed)
            offset = env.episode.start_offset
            assert np.all(offset >= tasks.START_OFFSET_LOW) and np.all(offset <= tasks.START_OFFSET_HIGH)
            assert np.linalg.norm(obs.tcp_pos - (np.asarray(scene.HOME_TCP_POS) + offset)) < 0.002
            assert abs(abs(obs.tcp_quat[1]) - 1.0) < 0.01  # still pointing straight down
            np.testing.assert_array_equal(offset, tasks.sample_episode(tasks.TASKS[seed % 3], seed).start_offset)
            starts.append(obs.tcp_pos)
        spread = np.ptp(np.asarray(starts), axis=0)
        assert np.all(spread > [0.05, 0.1, 0.04]), spread  # a fixed start lets policies cheat (tasks.py)
    finally:
        env.close()


def test_the_servo_handshake_gate_drops_what_moveit_servo_drops():
    from lapa_sim.servo_handshake import JOINT_BOUND, NO_WARNING, POSE, TWIST, ServoHandshake, status_of

    gate = ServoHandshake(required=True, incoming_command_timeout=0.1)
    assert "paused" in gate.refusal(0.0)
    gate.pause(False)
    assert "JOINT_JOG, not TWIST" in gate.refusal(0.0)
    assert not gate.switch(7) and gate.switch(POSE) and "POSE, not TWIST" in gate.refusal(0.0)
    assert gate.switch(TWIST) and gate.refusal(0.05) == ""
    assert "older than incoming_command_timeout 0.1 s" in gate.refusal(0.15)
    assert ServoHandshake(required=False).refusal(5.0) == ""  # clients that know nothing of Servo
    assert status_of("joint limit (panda_joint4)")[0] == JOINT_BOUND and status_of("stale command")[0] == NO_WARNING
