"""The demo's worker processes end when the demo does, also when it is killed on its own (a
supervisor's SIGTERM or SIGKILL reaches the demo, not its pool's workers)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from conftest import ROOT

PARENT = """
import multiprocessing, os, sys, time
from lapa_core.child_processes import pool_worker

def work(path):
    open(path, "w").write(str(os.getpid()))
    time.sleep(120)

if __name__ == "__main__":
    # as the demo's pools start their workers
    pool = multiprocessing.get_context("spawn").Pool(1, initializer=pool_worker, initargs=(0, 0.2))
    pool.apply_async(work, (sys.argv[1],))
    time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone for our purpose (its parent, init here, reaps it)
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_worker_ends_when_the_demo_is_killed(tmp_path):
    script, pid_file = tmp_path / "parent.py", tmp_path / "worker.pid"
    script.write_text(PARENT)
    parent = subprocess.Popen([sys.executable, str(script), str(pid_file)], cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (pid_file.is_file() and pid_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.1)
        worker = int(pid_file.read_text())
        assert _alive(worker)
        parent.send_signal(signal.SIGKILL)  # the parent alone, as a supervisor would
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(worker), "the worker kept running after the demo was killed"
    finally:  # whatever is left of the session the parent led
        try:
            os.killpg(parent.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
