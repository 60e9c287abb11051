"""The layers import one way: lapa_core < lapa_sim < lapa_training < lapa_policy_node < lapa_cli.

Every import statement of every module is parsed (top-level and inside functions alike), so a lazy
import against the order fails as surely as a module-level one. The core imports no ROS and no
training libraries, so the policy interface, controller step and safety limits run anywhere.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from conftest import ROOT

LAYERS = ("lapa_core", "lapa_sim", "lapa_training", "lapa_policy_node", "lapa_cli")
# third-party roots the core may not import: ROS, learning, simulation
CORE_FORBIDDEN = {"rclpy", "rcl_interfaces", "geometry_msgs", "sensor_msgs", "std_msgs", "lapa_interfaces",
                  "torch", "transformers", "mujoco", "rosbags", "cv2"}


def imports_of(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file; relative imports name their package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from . import x / from ..y import z: resolve against this package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                found.append((node.lineno, ".".join(base + ([node.module] if node.module else []))))
            elif node.module:
                found.append((node.lineno, node.module))
    return found


def layer_violations(root: Path = ROOT) -> tuple[list[str], int]:
    rank = {name: i for i, name in enumerate(LAYERS)}
    bad, checked = [], 0
    for package in LAYERS:
        for path in sorted((root / package).rglob("*.py")):
            for line, module in imports_of(path, root):
                top = module.split(".")[0]
                where = f"{path.relative_to(root)}:{line}"
                if package == "lapa_core" and top in CORE_FORBIDDEN:
                    bad.append(f"{where} (lapa_core) imports {module}: the core stays free of ROS and training code")
                if top in rank and top != package:
                    checked += 1
                    if rank[top] > rank[package]:
                        bad.append(f"{where} ({package}) imports {module}, a layer above it")
    return bad, checked


def test_every_layer_exists():
    for package in LAYERS:
        assert (ROOT / package / "__init__.py").is_file(), package


def test_nothing_imports_upward():
    bad, checked = layer_violations()
    assert checked > 50, f"only {checked} cross-package imports found: is the parser looking at the code?"
    assert not bad, "imports against the layer order " + " < ".join(LAYERS) + ":\n" + "\n".join(bad)


def test_the_check_catches_an_upward_import(tmp_path):
    """The checker itself can fail: a core module that imports a node module, lazily, is reported."""
    for package in LAYERS:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "lapa_core" / "bad.py").write_text("def f():\n    from lapa_policy_node import runtime\n")
    (tmp_path / "lapa_sim" / "ok.py").write_text("import lapa_core.policy\n")
    (tmp_path / "lapa_core" / "ros.py").write_text("import rclpy\n")
    bad, checked = layer_violations(tmp_path)
    assert checked == 2
    assert len(bad) == 2 and "lapa_core/bad.py:2" in bad[0] + bad[1] and "rclpy" in bad[0] + bad[1]


def test_core_loads_without_ros_or_torch():
    """Importing the core in a fresh interpreter pulls in neither rclpy nor torch."""
    import subprocess

    code = ("import sys, lapa_core.policy, lapa_core.safety, lapa_core.controller, lapa_core.node_params; "
            "print(sorted(m for m in ('rclpy', 'torch', 'lapa_training', 'lapa_policy_node') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
