"""Each node parameter is declared once, in lapa_core/node_params.py: the nodes declare from it, and
config/*.yaml, the launch files' defaults, README's tables and the motion limits agree with it."""

from __future__ import annotations

import ast
import re

import numpy as np
import pytest
import yaml

from conftest import ROOT
from lapa_core import node_params
from lapa_core.node_params import NODES, POLICY_SERVER, RECORDER, SIM_ARM, Param
from lapa_core.safety import MotionLimits

LAUNCH_NODES = {"policy.launch.py": POLICY_SERVER, "record.launch.py": RECORDER, "sim.launch.py": SIM_ARM}


@pytest.mark.parametrize("spec", NODES.values(), ids=list(NODES))
def test_config_file_lists_every_parameter_with_its_default(spec):
    data = yaml.safe_load((ROOT / "config" / spec.config_file).read_text())
    assert list(data) == [spec.node]
    values = data[spec.node]["ros__parameters"]
    assert list(values) == [p.name for p in spec], f"config/{spec.config_file} and the spec list different parameters"
    for p in spec:
        assert values[p.name] == p.default and type(values[p.name]) is type(p.default), \
            f"config/{spec.config_file}: {p.name} is {values[p.name]!r}, the spec says {p.default!r}"


@pytest.mark.parametrize("spec", NODES.values(), ids=list(NODES))
def test_spec_is_well_formed(spec):
    names = [p.name for p in spec]
    assert len(names) == len(set(names)), "a parameter is declared twice"
    for p in spec:
        assert p.description and "\n" not in p.description
        assert isinstance(p.default, (bool, int, float, str, list)), p.name
        if p.between is not None:
            assert isinstance(p.default, (int, float)) and not isinstance(p.default, bool), p.name
            assert p.between[0] <= p.default <= p.between[1], f"{p.name}: default outside its range"
        if p.choices:
            assert p.default in p.choices, p.name


def _launch_defaults(path) -> dict[str, tuple[str, str | None]]:
    """{node parameter: (launch argument, its default_value)} for parameters set from launch arguments."""
    tree = ast.parse(path.read_text())
    defaults = {}
    for call in ast.walk(tree):
        if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "DeclareLaunchArgument":
            kw = {k.arg: k.value for k in call.keywords}
            defaults[call.args[0].value] = kw["default_value"].value if "default_value" in kw else None
    mapped = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                wrapped = isinstance(value, ast.List)  # [arg("image_topic")] sets a list parameter
                call = value.elts[0] if wrapped and value.elts else value
                if isinstance(key, ast.Constant) and isinstance(call, ast.Call) and call.args \
                        and isinstance(call.args[0], ast.Constant) and call.args[0].value in defaults:
                    name = call.args[0].value
                    mapped[key.value] = (name, defaults[name], wrapped)
    return mapped


def _as_launch_text(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


@pytest.mark.parametrize("launch_file", sorted(LAUNCH_NODES))
def test_launch_defaults_are_the_spec_defaults(launch_file):
    spec = LAUNCH_NODES[launch_file]
    mapped = _launch_defaults(ROOT / "launch" / launch_file)
    assert mapped, f"{launch_file}: no launch argument sets a parameter (is the parser looking at the file?)"
    for param, (arg, default, wrapped) in mapped.items():
        expected = spec[param].default
        if wrapped:
            assert isinstance(expected, list) and len(expected) == 1, param
            expected = expected[0]
        if default is None:  # a required argument: the spec's default must mean "not given"
            assert expected in ("", []), f"{launch_file}: {arg} has no default but {param} has {expected!r}"
        else:
            assert default == _as_launch_text(expected), \
                f"{launch_file}: {arg} defaults to {default!r}, the spec's {param} to {expected!r}"


def test_readme_tables_are_generated_from_the_spec():
    readme = (ROOT / "README.md").read_text()
    marker = "<!-- node-parameters: generated from lapa_core/node_params.py, checked by tests/test_node_params.py -->"
    assert marker in readme
    section = readme.split(marker, 1)[1].split("\n## ", 1)[0].strip()
    assert section == node_params.markdown_tables().strip(), \
        "README's node parameter tables differ from the spec: regenerate them with " \
        "`.venv/bin/python -m lapa_core.node_params` and paste the output under the marker"


def test_motion_limit_defaults_are_the_policy_servers():
    limits = MotionLimits()
    for name in ("max_linear_speed", "max_angular_speed", "max_linear_accel", "max_angular_accel",
                 "servo_command_timeout"):
        assert getattr(limits, name) == POLICY_SERVER[name].default
    np.testing.assert_array_equal(limits.workspace_min, POLICY_SERVER["workspace_min"].default)
    np.testing.assert_array_equal(limits.workspace_max, POLICY_SERVER["workspace_max"].default)
    limits = MotionLimits.from_params({**POLICY_SERVER.defaults(), "max_linear_speed": 0.05})
    assert limits.max_linear_speed == 0.05
    with pytest.raises(ValueError, match="must be below"):
        MotionLimits.from_params({**POLICY_SERVER.defaults(), "workspace_min": [1.0, 0.0, 0.0]})


def test_spec_matches_the_code_conventions_it_names():
    """Values the spec spells out because the core may not import the packages that define them."""
    from lapa_sim import scene, tasks
    from lapa_training.data import bag_format
    from lapa_training.data.episode_writer import STORAGES

    assert SIM_ARM["base_frame"].default == scene.BASE_FRAME
    assert all(re.search(rf"\b{t}\b", SIM_ARM["task"].description) for t in tasks.TASKS)
    assert RECORDER["storage"].choices == tuple(STORAGES)
    assert RECORDER["image_topics"].default == [bag_format.IMAGE_TOPIC]
    assert RECORDER["camera_info_topics"].default == [bag_format.CAMERA_INFO_TOPIC]
    assert RECORDER["twist_topic"].default == bag_format.TWIST_TOPIC
    assert RECORDER["gripper_topic"].default == bag_format.GRIPPER_TOPIC
    assert RECORDER["joint_state_topic"].default == bag_format.JOINT_STATE_TOPIC
    assert RECORDER["ee_pose_topic"].default == bag_format.EE_POSE_TOPIC


def test_choices_are_checked():
    p = Param("mode", "a", "a or b", choices=("a", "b"))
    assert p.check("a") is None
    assert p.check("c") == "'c' is not one of a, b"


def test_nodes_declare_from_the_spec_alone():
    """No node declares a parameter of its own beside the spec (runtime.declare is for declare_params)."""
    for path in sorted((ROOT / "lapa_policy_node").glob("*_node.py")):
        text = path.read_text()
        assert "declare_params(" in text, path.name
        assert not re.search(r"\bdeclare\(|declare_parameter\(", text), f"{path.name} declares a parameter itself"
