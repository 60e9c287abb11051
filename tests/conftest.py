"""Shared test fixtures: ROS 2 isolation, a spinning test node, and node processes.

Every test run gets its own ROS_DOMAIN_ID and localhost-only discovery, so parallel runs on one
machine (and anything else on the network) never see each other. Nodes under test run as
separate processes and talk to the test over real DDS.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from lapa_policy_node.private_domain import claim_domain

ROOT = Path(__file__).resolve().parent.parent

# a domain no other test run or lapa job on this machine holds, locked for the whole run; 1-100: below
# the private domains of lapa jobs, and Fast DDS's ports stay under the ephemeral range
TEST_DOMAIN, _DOMAIN_LOCK = claim_domain(range(1, 101))
os.environ["ROS_DOMAIN_ID"] = str(TEST_DOMAIN)
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ.setdefault("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
os.environ["ROS_LOG_DIR"] = tempfile.mkdtemp(prefix="lapa-test-roslog-")
os.environ.setdefault("MUJOCO_GL", "egl")


def wait_for(predicate, timeout: float, interval: float = 0.02, what: str = "condition"):
    """Poll predicate until it returns a truthy value; fail the test with `what` on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.1f} s waiting for {what}")


@pytest.fixture(scope="session")
def ros():
    import rclpy

    rclpy.init()
    yield rclpy
    rclpy.try_shutdown()


@pytest.fixture(scope="module")
def test_node(ros):
    """A node for the test's own publishers/subscribers, spun in a background thread."""
    from lapa_policy_node.runtime import spinning

    with spinning(ros.create_node(f"lapa_test_{os.getpid()}_{random.randint(0, 1 << 30)}")) as node:
        yield node


class Latest:
    """Keeps the newest message of a topic and counts them."""

    def __init__(self, node, msg_type, topic, qos=10):
        self.msg, self.count, self.lock = None, 0, threading.Lock()
        node.create_subscription(msg_type, topic, self._on, qos)

    def _on(self, msg):
        with self.lock:
            self.msg, self.count = msg, self.count + 1

    def get(self):
        with self.lock:
            return self.msg


class NodeProcess:
    """A node under test, in its own process, with its output captured to a file."""

    def __init__(self, module: str, params: dict | None = None, extra: list[str] | None = None):
        self.log = tempfile.NamedTemporaryFile(prefix=f"{module.rsplit('.', 1)[-1]}-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", module, "--ros-args"]
        for k, v in (params or {}).items():
            cmd += ["-p", f"{k}:={v}"]
        cmd += extra or []
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def stop(self, sig=None, timeout: float = 10.0) -> int:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(sig or signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def run_to_exit(module: str, params: dict, timeout: float = 60.0) -> tuple[int, str]:
    """Start a node that is expected to exit by itself (e.g. on bad parameters)."""
    node = NodeProcess(module, params)
    try:
        node.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        node.stop()
        pytest.fail(f"{module} with {params} did not exit within {timeout} s:\n{node.output()}")
    return node.proc.returncode, node.output()


# ---------------------------------------------------------------------------------------------
# A small simulator dataset shared by the learning tests (LAQ, labelling, VLA)
# ---------------------------------------------------------------------------------------------
SIM_DATASET_TASKS = ("reach", "push", "pick_place")
SIM_DATASET_EPISODES_PER_TASK = 4


@pytest.fixture(scope="session")
def sim_dataset(tmp_path_factory) -> Path:
    """Scripted-expert episodes of every sim task, rendered at 64x64, written as real MCAP bags and
    ingested into a dataset (splits 0.5/0.25/0.25 by episode, so val and test are not empty).
    Read-only for tests: copy it before writing into it."""
    from lapa_training.data.generate import generate
    from lapa_training.data.ingest import IngestOptions, ingest

    root = tmp_path_factory.mktemp("sim_dataset")
    generate(root / "bags", list(SIM_DATASET_TASKS), SIM_DATASET_EPISODES_PER_TASK, image_size=64, progress=False)
    ingest([root / "bags"], root / "data", IngestOptions(image_size=64, split=(0.5, 0.25, 0.25), seed=0,
                                                         progress=False, warn=lambda msg: None))
    return root / "data"


def user_error(capsys, argv: list[str], *needles: str) -> str:
    """Run `lapa argv` in-process; assert it failed as a user mistake should (exit 2, one line on
    stderr, no traceback) and that the line says each of `needles`. Returns the line."""
    from lapa_cli.main import main

    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("lapa ") and err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err
