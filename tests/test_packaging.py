"""The package as ROS 2 sees it: colcon builds ros2_ws (interfaces + this package), the executables
and share files land where `ros2 run`/`ros2 launch` look, and launch files name real executables."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

EXECUTABLES = ("lapa", "lapa_sim_arm", "lapa_recorder", "lapa_policy_server")


def test_launch_files_parse_and_start_executables_this_package_installs():
    setup_text = (ROOT / "setup.py").read_text()
    for name in EXECUTABLES:
        assert f'"{name} = ' in setup_text, f"console script {name} missing from setup.py"
    launch_files = sorted((ROOT / "launch").glob("*.launch.py"))
    assert launch_files
    for path in launch_files:
        tree = ast.parse(path.read_text(), filename=str(path))
        names = {f.name for f in tree.body if isinstance(f, ast.FunctionDef)}
        assert "generate_launch_description" in names, path
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg == "executable" and isinstance(node.value, ast.Constant):
                exe = node.value.value
                assert exe in EXECUTABLES or exe == "robot_state_publisher", f"{path.name}: unknown executable {exe}"


@pytest.mark.skipif(shutil.which("colcon", path=str(Path(sys.executable).parent)) is None,
                    reason="colcon not installed in this environment")
def test_colcon_builds_the_workspace_with_interfaces_and_package(tmp_path):
    repo = tmp_path / "repo"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for rel in filter(None, tracked.decode().split("\0")):
        src, dst = ROOT / rel, repo / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            dst.symlink_to(os.readlink(src))
        elif src.is_file():
            shutil.copy2(src, dst)
    venv = Path(sys.prefix)
    env = {**os.environ, "AMENT_PREFIX_PATH": str(venv), "CMAKE_PREFIX_PATH": str(venv),
           "PATH": f"{venv / 'bin'}:{os.environ['PATH']}"}
    ws = repo / "ros2_ws"
    result = subprocess.run([str(venv / "bin" / "colcon"), "build", "--event-handlers", "console_cohesion-"],
                            cwd=ws, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    install = ws / "install"
    for name in EXECUTABLES:
        assert (install / "lapa_ros" / "lib" / "lapa_ros" / name).is_file(), name
    share = install / "lapa_ros" / "share" / "lapa_ros"
    for rel in ("package.xml", "urdf/lapa_panda.urdf", "config/sim_arm.yaml", "launch/sim.launch.py"):
        assert (share / rel).is_file(), rel
    assert (install / "lapa_interfaces" / "share" / "lapa_interfaces" / "action" / "FollowInstruction.action").is_file()
