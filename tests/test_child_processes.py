"""lapa_core.child_processes, the one helper every child process of the project starts through: a
group of its own, a lower priority when asked, the end of the child with its parent (also after a
SIGKILL of the parent) and a stop that escalates to SIGKILL. (The demo's background commands and
pool workers are tested in test_background.py and test_demo_workers.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from conftest import ROOT

from lapa_core.child_processes import LOWEST_PRIORITY, PARENT_ENV, spawn, stop


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def test_a_child_leads_its_own_group_knows_its_parent_and_starts_at_the_priority_asked(tmp_path):
    out = tmp_path / "out.txt"
    code = (f"import os; env = os.environ[{PARENT_ENV!r}]; priority = os.getpriority(os.PRIO_PROCESS, 0); "
            f"open({str(out)!r}, 'w').write(f'{{os.getpgrp() == os.getpid()}} {{env}} {{priority}}')")
    child = spawn([sys.executable, "-c", f"import time; time.sleep(0.3); {code}"], priority=LOWEST_PRIORITY)
    assert child.wait(timeout=30) == 0
    assert out.read_text() == f"True {os.getpid()} {LOWEST_PRIORITY}"
    assert os.getpgrp() != child.pid  # this process's group is not the child's


def test_stop_interrupts_and_kills_only_what_does_not_stop():
    # its own SIGINT handler: a test run started in the background (`cmd &`) ignores SIGINT, and children inherit that
    polite = spawn([sys.executable, "-c", "import signal, time\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
                                          "try:\n    print('ready', flush=True)\n    time.sleep(60)\n"
                                          "except KeyboardInterrupt:\n    pass"], stdout=subprocess.PIPE)
    stubborn = spawn([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                                            "print('ready', flush=True); time.sleep(60)"], stdout=subprocess.PIPE)
    # each is where the signal must find it: inside its try block, or with SIGINT ignored
    assert polite.stdout.readline().strip() == b"ready" and stubborn.stdout.readline().strip() == b"ready"
    t0 = time.monotonic()
    killed = stop([polite, stubborn], timeout=5.0)  # time enough for the polite one on a loaded machine
    assert killed == [stubborn] and time.monotonic() - t0 < 30
    assert polite.returncode == 0 and stubborn.returncode == -signal.SIGKILL


PARENT = """
import sys, time
from lapa_core.child_processes import spawn

child = spawn([sys.executable, "-c", "import time; time.sleep(120)"])
open(sys.argv[1], "w").write(str(child.pid))
time.sleep(120)
"""


def test_a_child_ends_when_its_parent_is_killed(tmp_path):
    script, pid_file = tmp_path / "parent.py", tmp_path / "child.pid"
    script.write_text(PARENT)
    parent = subprocess.Popen([sys.executable, str(script), str(pid_file)], cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    child = None
    try:
        deadline = time.monotonic() + 60
        while not (pid_file.is_file() and pid_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        child = int(pid_file.read_text())
        assert _alive(child)
        parent.kill()  # SIGKILL: the parent cleans nothing up
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child), "the child kept running after its parent was killed"
    finally:
        parent.kill()
        if child is not None:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
