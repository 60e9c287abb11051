"""The ROS-free core on its own: the controller step and the registry of policy types."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lapa_core.controller import Controller
from lapa_core.policy import (ConstantPolicy, PolicyLoadError, load_policy, register_policy_type,
                              registered_policy_types)
from lapa_core.safety import CommandLimiter, MotionLimits, UnsafeCommand, delta_to_twist

IMAGE = np.zeros((8, 8, 3), np.uint8)


def test_controller_step_is_delta_to_twist_then_the_limiter():
    delta = [0.004, -0.002, 0.001, 0.0, 0.0, 0.05, 0.7]
    limits = MotionLimits(max_linear_accel=0.2)
    controller = Controller(ConstantPolicy(delta), limits, control_rate=10.0, linear_scale=0.5, angular_scale=2.0)
    controller.reset("go")
    limiter = CommandLimiter(limits, 0.1)
    tcp = np.array([0.5, 0.0, 0.2])
    for _ in range(5):
        command = controller.step(IMAGE, "go", tcp, pose_age=0.05)
        twist, closure = delta_to_twist(delta, 10.0, 0.5, 2.0)
        np.testing.assert_allclose(command.twist, limiter(twist, tcp, 0.05))
        assert command.closure == pytest.approx(closure) and command.step.delta.tolist() == delta
        assert command.act_seconds >= 0
    # the acceleration limit held the first steps below the commanded speed
    assert np.linalg.norm(controller.step(IMAGE, "go", tcp).twist[:3]) <= np.linalg.norm(twist[:3]) + 1e-12


def test_reset_and_arm_stopped_start_from_rest():
    controller = Controller(ConstantPolicy([0.01, 0, 0, 0, 0, 0, 0]), MotionLimits(max_linear_accel=0.1), 10.0)
    controller.reset("go")
    first = controller.step(IMAGE, "go", None).twist
    second = controller.step(IMAGE, "go", None).twist
    assert second[0] > first[0] > 0  # ramping up
    controller.arm_stopped()
    np.testing.assert_allclose(controller.step(IMAGE, "go", None).twist, first)
    controller.reset("again")
    assert controller.policy.steps == 0


def test_unsafe_and_raising_policies_reach_the_caller():
    controller = Controller(ConstantPolicy([0.0] * 7, nan_at_step=1), MotionLimits(), 10.0)
    controller.reset("go")
    with pytest.raises(UnsafeCommand):
        controller.propose(IMAGE, "go")
    controller = Controller(ConstantPolicy([0.0] * 7, raise_at_step=1), MotionLimits(), 10.0)
    with pytest.raises(RuntimeError, match="injected"):
        controller.step(IMAGE, "go", None)


def test_registered_policy_types_load_by_their_config(tmp_path):
    class Echo:
        control_rate = 5.0

        def __init__(self, config):
            self.config = config

    register_policy_type("echo_for_test", lambda path, config: Echo(config))
    (tmp_path / "config.json").write_text(json.dumps({"policy_type": "echo_for_test", "k": 3}))
    assert load_policy(tmp_path).config["k"] == 3
    assert {"constant", "echo_for_test", "lapa_vla"} <= set(registered_policy_types())


def test_unknown_or_malformed_checkpoints_are_one_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"policy_type": "carrier-pigeon"}))
    with pytest.raises(PolicyLoadError, match="unknown policy_type 'carrier-pigeon' \\(known: .*'lapa_vla'"):
        load_policy(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(PolicyLoadError, match="expected a JSON object"):
        load_policy(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"policy_type": "constant", "delta": [0.0] * 7, "bogus": 1}))
    with pytest.raises(PolicyLoadError, match="bogus"):
        load_policy(tmp_path)


def test_an_uninstalled_package_is_named_as_the_cause(tmp_path, monkeypatch):
    """Run from a source tree that was never installed, no entry point brings 'lapa_vla': say so."""
    import lapa_core.policy as policy

    monkeypatch.setattr(policy, "_installed_policy_types", set)
    monkeypatch.setattr(policy, "_LOADERS", {"constant": policy._LOADERS["constant"]})
    (tmp_path / "config.json").write_text(json.dumps({"policy_type": "lapa_vla"}))
    with pytest.raises(PolicyLoadError, match=r"unknown policy_type 'lapa_vla' \(known: 'constant'\); no "
                                              r"lapa_ros.policy_types entry points are installed"):
        load_policy(tmp_path)


@pytest.mark.parametrize("content, message", [
    (b"\xff\xfe not utf-8 \x80", "cannot read .*config.json: UnicodeDecodeError"),
    (b'["a", "list"]', "expected a JSON object"),
    (json.dumps({"policy_type": "constant", "delta": ["a"] * 7}).encode(), "'delta' needs 7 finite numbers"),
    (json.dumps({"policy_type": "constant", "delta": [0.0] * 6}).encode(), "'delta' needs 7 finite numbers"),
    (json.dumps({"policy_type": "constant", "delta": [0.0] * 6 + [float("nan")]}).encode(), "7 finite numbers"),
    (json.dumps({"policy_type": "constant", "delta": [0.0] * 7, "control_rate": 0}).encode(),
     "'control_rate' must be a number > 0"),
    (json.dumps({"policy_type": "constant", "delta": [0.0] * 7, "control_rate": "10"}).encode(),
     "'control_rate' must be a number"),
    (json.dumps({"policy_type": "constant", "delta": [0.0] * 7, "nan_at_step": 1.5}).encode(),
     "'nan_at_step' must be an integer >= 0"),
    (json.dumps({"policy_type": "constant", "delta": [0.0] * 7, "seconds_per_step": -1}).encode(),
     "'seconds_per_step' must be a number >= 0"),
])
def test_a_bad_checkpoint_config_is_one_error_at_load_time(tmp_path, content, message):
    """Every setting of a checkpoint is checked when it loads: a server never starts on one it would crash on."""
    (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(PolicyLoadError, match=message):
        load_policy(tmp_path)


def test_a_loader_that_trips_on_a_setting_is_one_error(tmp_path):
    register_policy_type("fragile_for_test", lambda path, config: config["missing"])
    (tmp_path / "config.json").write_text(json.dumps({"policy_type": "fragile_for_test"}))
    with pytest.raises(PolicyLoadError, match=r"config.json: bad or missing setting \(KeyError: 'missing'\)"):
        load_policy(tmp_path)
    register_policy_type("no_rate_for_test", lambda path, config: object())
    (tmp_path / "config.json").write_text(json.dumps({"policy_type": "no_rate_for_test"}))
    with pytest.raises(PolicyLoadError, match="control_rate must be a number > 0, got None"):
        load_policy(tmp_path)


def test_health_meters_and_statuses():
    from lapa_core.health import OK, STALE, WARN, LatencyMeter, RateMeter, policy_server_statuses, recorder_statuses

    camera = RateMeter(window_s=2.0)
    for i in range(21):
        camera.add(100.0 + i * 0.05)  # 20 Hz for 1 s
    assert abs(camera.rate(101.0) - 20.0) < 1e-6 and abs(camera.age(101.2) - 0.2) < 1e-9 and camera.gaps() == 0
    camera.add(101.5)  # ten frames missing
    assert camera.gaps() == 1
    latency = LatencyMeter()
    for ms in range(1, 101):
        latency.add(ms / 1000)
    assert abs(latency.percentile(50) - 0.0505) < 1e-9 and latency.percentile(99) > 0.099
    fast = policy_server_statuses(101.6, camera=camera, camera_timeout=0.25, latency=latency, period=0.2,
                                  servo=(0, ""), goal="idle", checkpoint="/ckpt")
    assert [s.level for s in fast] == [OK, OK, OK, OK]
    assert fast[1].values["latency_p99_ms"] == "99.0" and fast[1].values["checkpoint"] == "/ckpt"
    slow = policy_server_statuses(103.0, camera=camera, camera_timeout=0.25, latency=latency, period=0.05,
                                  servo=(6, "joint bound"), goal="running 'x'", checkpoint="/ckpt")
    assert slow[0].level == WARN and "no frame for 1.50 s" in slow[0].message
    assert slow[1].level == WARN and "exceeds the control period 50 ms" in slow[1].message
    assert slow[3].level == 2 and slow[3].message == "joint bound"
    rec = recorder_statuses(101.6, {"/camera/image_raw": camera, "/joint_states": RateMeter()}, "ep_1")
    assert rec[0].message == "recording 'ep_1'"
    assert {s.name: s.level for s in rec[1:]} == {"lapa_recorder: /camera/image_raw": WARN,
                                                  "lapa_recorder: /joint_states": STALE}
