"""Batch jobs run their simulated arm in a private ROS domain (lapa_policy_node.private_domain): the
teleop and the policy server publish on /servo_node/delta_twist_cmds, the topic a real MoveIt Servo
listens on, so they must never join the shell's domain, where a robot may be.

The domain logic runs in fresh Python processes: this test process may already run rclpy (other
tests' fixtures), and then private_ros_domain keeps the running context's domain, by design."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

from geometry_msgs.msg import PoseStamped, TwistStamped

from conftest import ROOT

SLACK = ["-p", "lapa_policy_server:camera_timeout:=2.0", "-p", "lapa_policy_server:pose_timeout:=2.0"]


def _python(code: str, env: dict, timeout: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_a_private_domain_replaces_the_shells_isolates_and_is_given_back(tmp_path):
    shell = {"ROS_DOMAIN_ID": "0", "ROS_AUTOMATIC_DISCOVERY_RANGE": "SUBNET", "ROS_STATIC_PEERS": "192.168.1.20",
             "ROS_DISCOVERY_SERVER": "192.168.1.21:11811",
             # a DDS configuration that names peers of its own (a robot's network) must not come along either
             "FASTRTPS_DEFAULT_PROFILES_FILE": "/etc/robot/fastdds.xml",
             "FASTDDS_DEFAULT_PROFILES_FILE": "/etc/robot/fastdds.xml", "RMW_FASTRTPS_USE_QOS_FROM_XML": "1",
             "FASTDDS_ENVIRONMENT_FILE": "/etc/robot/fastdds_env.json", "CYCLONEDDS_URI": "file:///etc/robot/cyclone.xml"}
    env = {**os.environ, **shell}
    done = _python(f"""
        import json, os, pathlib
        from lapa_policy_node import private_domain as pd
        pd.LOCK_DIR = pathlib.Path({str(tmp_path / "locks")!r})
        keys = {sorted(shell)!r}
        before = {{k: os.environ.get(k) for k in keys}}
        with pd.private_ros_domain() as first:
            inside = {{k: os.environ.get(k) for k in keys}}
            with pd.private_ros_domain() as second:  # a second job on the machine gets another domain
                pass
        after = {{k: os.environ.get(k) for k in keys}}
        with pd.private_ros_domain() as again:  # given back: the lock is free again
            pass
        pd.PRIVATE_DOMAINS = range(first, first + 1)
        with pd.private_ros_domain():
            try:
                with pd.private_ros_domain():
                    full = None
            except pd.DomainError as e:
                full = str(e)
        print(json.dumps({{"first": first, "second": second, "inside": inside, "before": before, "after": after,
                          "full": full}}))
    """, env)
    assert done.returncode == 0, done.stderr
    r = json.loads(done.stdout.strip().splitlines()[-1])
    assert 215 <= r["first"] <= 232 and 215 <= r["second"] <= 232 and r["first"] != r["second"]
    assert r["inside"] == {**{k: None for k in shell}, "ROS_DOMAIN_ID": str(r["first"]),
                           "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST"}
    assert r["after"] == r["before"] == shell
    assert r["full"] and "no free private ROS domain" in r["full"] and "1 lapa jobs already hold" in r["full"]


def test_a_test_run_holds_its_domain_so_a_second_run_on_the_machine_takes_another():
    from conftest import TEST_DOMAIN

    assert os.environ["ROS_DOMAIN_ID"] == str(TEST_DOMAIN)
    done = _python(f"""
        from lapa_policy_node import private_domain as pd
        try:
            pd.claim_domain(range({TEST_DOMAIN}, {TEST_DOMAIN + 1}))
            print("claimed")
        except pd.DomainError as e:
            print("refused:", e)
        print(pd.claim_domain(range(1, 101))[0])
    """, dict(os.environ))
    assert done.returncode == 0, done.stderr
    refused, other = done.stdout.strip().splitlines()[-2:]
    assert refused.startswith("refused: no free private ROS domain") and int(other) != TEST_DOMAIN


def test_a_process_that_runs_rclpy_keeps_its_domain(tmp_path):
    done = _python("""
        import os, rclpy
        from lapa_policy_node.private_domain import private_ros_domain
        rclpy.init(domain_id=42)
        os.environ["ROS_DOMAIN_ID"] = "7"
        with private_ros_domain() as domain:
            print(domain, os.environ["ROS_DOMAIN_ID"])
        rclpy.shutdown()
    """, dict(os.environ))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["42", "7"]


def test_an_evaluation_through_ros_never_reaches_the_shells_domain(tmp_path, test_node):
    """The shell's domain here is this test's (conftest): a node in it must hear none of the eval's
    poses and twists, while the eval itself runs its episode to the end in its own domain."""
    from lapa_core.policy import ConstantPolicy

    heard = {"pose": 0, "twist": 0}

    def count(kind: str):
        return lambda msg: heard.__setitem__(kind, heard[kind] + 1)

    subs = [test_node.create_subscription(PoseStamped, "/ee_pose", count("pose"), 10),
            test_node.create_subscription(TwistStamped, "/servo_node/delta_twist_cmds", count("twist"), 10)]
    policy = ConstantPolicy.save(tmp_path / "policy", (0.004, 0, 0, 0, 0, 0, 0))
    try:
        done = _python(f"""
            from lapa_policy_node.ros_eval import evaluate_over_ros
            report = evaluate_over_ros({str(policy)!r}, [("reach", 100_000)], image_size=48,
                                       out_dir={str(tmp_path / "eval")!r}, progress=True, ros_args={SLACK!r})
            print("steps", report.episodes[0].steps)
        """, dict(os.environ), timeout=180.0)
        time.sleep(0.5)  # anything still in flight
    finally:
        for sub in subs:
            test_node.destroy_subscription(sub)
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.split()[-1]) > 0
    assert json.loads((tmp_path / "eval" / "report.json").read_text())["episodes"][0]["steps"] > 0
    assert heard == {"pose": 0, "twist": 0}, f"the eval's nodes talked in the shell's domain: {heard}"
    announced = [line for line in done.stderr.splitlines() if "private ROS domain" in line]
    assert announced and "ROS_DOMAIN_ID=" in announced[0], done.stderr[-2000:]
    domain = int(announced[0].split("ROS_DOMAIN_ID=")[1].split()[0])
    assert 215 <= domain <= 232 and str(domain) != os.environ["ROS_DOMAIN_ID"]


def test_cli_eval_passes_ros_args_to_the_nodes_and_refuses_them_without_ros(tmp_path, monkeypatch, capsys):
    from lapa_cli.main import main
    from lapa_policy_node import ros_eval
    from lapa_core.policy import ConstantPolicy
    from lapa_training.eval_policy import PolicyReport

    policy = ConstantPolicy.save(tmp_path / "policy", (0, 0, 0, 0, 0, 0, 0))
    args = ["eval", "policy", "--policy", str(policy), "--tasks", "reach", "--episodes", "1", "--out",
            str(tmp_path / "out")]
    assert main(args + ["--ros-args", "-p", "lapa_policy_server:camera_timeout:=1.0"]) == 2
    assert "--ros-args apply to the nodes of an evaluation through ROS: add --ros" in capsys.readouterr().err

    seen = {}

    def fake(policy_dir, jobs, **kwargs):
        seen.update(kwargs)
        report = PolicyReport()
        report.finish([], time.perf_counter())
        return report

    monkeypatch.setattr(ros_eval, "evaluate_over_ros", fake)
    assert main(args + ["--ros", "--ros-args", "-p", "lapa_policy_server:camera_timeout:=1.0"]) == 0
    assert seen["ros_args"] == ["--ros-args", "-p", "lapa_policy_server:camera_timeout:=1.0"]
