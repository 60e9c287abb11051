"""evaluate_over_ros: the simulated arm and the policy server in processes of their own, over real
DDS, one FollowInstruction goal per (task, seed) job; the same PolicyReport as the in-process eval.

The error tests run with no rclpy context (evaluate_over_ros makes and ends its own); the last test
runs inside the test node's context (evaluate_over_ros uses that one and leaves it up). A real VLA
checkpoint through the server is tested in test_run_sim_demo.py; here it would add about 30 s
(torch and the model load in the server process, then an 8 s episode in real time)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from geometry_msgs.msg import PoseStamped

from lapa_core.policy import ConstantPolicy
from lapa_policy_node.ros_eval import RosEvalError, evaluate_over_ros

# a loaded 2-core machine can delay a rendered frame past the default 0.25 s camera watchdog
# a loaded CI machine can hold a node's callbacks back for over the default half second
SLACK = ["-p", "lapa_policy_server:camera_timeout:=2.0", "-p", "lapa_policy_server:pose_timeout:=2.0"]


def _node_children() -> list[int]:
    """Live child processes of this test process that run a node (lapa_cli.run --node ...)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and fields[0] != "Z" and b"lapa_cli.run" in cmdline:
            out.append(int(stat.parent.name))
    return out


def test_a_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(RosEvalError, match="checkpoint not found: .*nowhere"):
        evaluate_over_ros(tmp_path / "nowhere", [("reach", 0)], progress=False)
    with pytest.raises(RosEvalError, match="unknown task 'juggle'"):
        evaluate_over_ros(ConstantPolicy.save(tmp_path / "p", [0] * 7), [("juggle", 0)], progress=False)
    with pytest.raises(RosEvalError, match="unknown instruction set 'shouted'"):
        evaluate_over_ros(ConstantPolicy.save(tmp_path / "p", [0] * 7), [("reach", 0, "shouted")], progress=False)
    assert not _node_children()


def test_a_server_that_dies_at_start_is_a_clear_error_and_no_node_is_left(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"policy_type": "carrier-pigeon"}')
    with pytest.raises(RosEvalError) as err:
        evaluate_over_ros(broken, [("reach", 0)], image_size=48, progress=False, log_dir=tmp_path / "logs")
    message = str(err.value)
    assert "lapa_policy_server exited with code 2" in message, message
    assert "unknown policy_type 'carrier-pigeon'" in message, message  # the end of its log
    assert (tmp_path / "logs" / "lapa_sim_arm.log").exists()
    assert not _node_children(), "the simulated arm was left running"


def test_two_reach_episodes_through_ros(tmp_path, test_node):
    xs = []  # the TCP's x while the episodes run (this process's rclpy context is already up)
    sub = test_node.create_subscription(PoseStamped, "/ee_pose", lambda m: xs.append(m.pose.position.x), 10)
    policy = ConstantPolicy.save(tmp_path / "policy", (0.004, 0, 0, 0, 0, 0, 0))  # +x, 0.04 m/s at 10 Hz
    out = tmp_path / "eval"
    try:
        # the second job with an instruction set of its own
        report = evaluate_over_ros(policy, [("reach", 100_000), ("reach", 100_001, "paraphrase")], image_size=48,
                                   out_dir=out, progress=False, ros_args=SLACK)
    finally:
        test_node.destroy_subscription(sub)
    assert [(e.task, e.seed) for e in report.episodes] == [("reach", 100_000), ("reach", 100_001)]
    from lapa_sim.tasks import sample_episode

    assert [e.instruction for e in report.episodes] == [sample_episode("reach", 100_000, "train").instruction,
                                                        sample_episode("reach", 100_001, "paraphrase").instruction]
    for e in report.episodes:
        assert isinstance(e.success, bool) and e.instruction
        assert e.failure is None, e  # success or max_steps, not a watchdog or a policy error
        assert e.success or e.steps == 80  # MAX_SECONDS["reach"] (8 s) at the policy's 10 Hz
        assert 0 < e.steps <= 80 and 0 < e.seconds < 8 * 1.5 + 5, e
    assert report.act_ms_p50 > 0 and report.act_ms_p99 >= report.act_ms_p50
    # the policy drove the arm along +x: add up the small forward steps between pose messages (a
    # reset moves the TCP to the next episode's start in one jump of several cm, left out here)
    steps = np.diff(xs)
    assert steps[(steps > 0) & (steps < 0.01)].sum() > 0.05, "the arm did not move"
    data = json.loads((out / "report.json").read_text())
    assert data["path"] == "ros" and len(data["episodes"]) == 2 and data["control_rate"] == 10.0
    assert {"success_rate", "by_task", "act_ms_p50", "wall_seconds"} <= set(data)
    assert "first camera frame" in (out / "lapa_policy_server.log").read_text()
    assert "simulated arm ready" in (out / "lapa_sim_arm.log").read_text()
    assert not _node_children()
