"""Commands run one after another at the lowest priority beside real-time work (the demo's data
stage): they run in order, stop at the first failure with its log in the error, and stop() ends the
running one and starts no more."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from lapa_cli.background import BackgroundError, LowPriorityCommands, lapa_argv, shown


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_commands_run_in_order_at_the_lowest_priority(tmp_path):
    out = tmp_path / "out.txt"
    job = LowPriorityCommands("writing", [
        _py(f"import os; open({str(out)!r}, 'a').write(f'first {{os.getpriority(os.PRIO_PROCESS, 0)}}\\n')"),
        _py(f"open({str(out)!r}, 'a').write('second\\n'); print('said')")], tmp_path / "job.log").start()
    job.wait()
    assert out.read_text() == "first 19\nsecond\n"
    log = (tmp_path / "job.log").read_text()
    assert log.count("$ ") == 2 and "said" in log


def test_the_chain_stops_at_the_first_failure_and_the_error_names_it_with_its_log(tmp_path):
    out = tmp_path / "never.txt"
    job = LowPriorityCommands("making things", [
        _py("import sys; print('the disk is full', file=sys.stderr); sys.exit(3)"),
        _py(f"open({str(out)!r}, 'w')")], tmp_path / "job.log").start()
    with pytest.raises(BackgroundError, match="(?s)making things failed: .* exited with status 3 .*job.log.*"
                                              "the disk is full"):
        job.wait()
    assert not out.exists() and len(job.processes) == 1


def test_a_command_that_cannot_start_is_an_error_too(tmp_path):
    job = LowPriorityCommands("running nothing", [[str(tmp_path / "no-such-program")]], tmp_path / "job.log").start()
    with pytest.raises(BackgroundError, match="running nothing failed: .*no-such-program` could not start"):
        job.wait()


def test_stop_ends_the_running_command_and_starts_no_more(tmp_path):
    out = tmp_path / "never.txt"
    job = LowPriorityCommands("sleeping", [_py("import time; time.sleep(60)"), _py(f"open({str(out)!r}, 'w')")],
                              tmp_path / "job.log").start()
    deadline = time.monotonic() + 30
    while not job.processes and time.monotonic() < deadline:
        time.sleep(0.02)
    t0 = time.monotonic()
    job.stop()
    assert time.monotonic() - t0 < 30
    assert [p.returncode for p in job.processes] == [-signal.SIGTERM] and not out.exists()


def test_lapa_commands_are_shown_as_the_user_would_type_them():
    argv = lapa_argv("data", "ingest", "/bags/with space", "--out", "/data")
    assert argv[:3] == [sys.executable, "-m", "lapa_cli.main"]
    assert shown(argv) == "lapa data ingest '/bags/with space' --out /data"
    assert os.path.basename(shown(_py("pass")).split()[0].strip("'")).startswith("python")


PARENT = """
import sys, time
from pathlib import Path
from lapa_cli.background import LowPriorityCommands, lapa_argv

out, log, pid_file = sys.argv[1:]
job = LowPriorityCommands("generating", [lapa_argv("data", "generate", "--out", out, "--tasks", "reach",
                                                   "--episodes", "5000", "--image-size", "32", "--workers", "2")],
                          Path(log)).start()
while not job.processes:
    time.sleep(0.05)
Path(pid_file).write_text(str(job.processes[0].pid))
time.sleep(300)
"""


def _group(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def test_a_command_and_its_workers_end_when_the_process_that_started_it_is_killed(tmp_path):
    """SIGKILL leaves the demo no chance to stop its commands: they notice and end, workers too,
    instead of writing on into folders a new run may be filling."""
    import subprocess

    from conftest import ROOT

    script, pid_file = tmp_path / "parent.py", tmp_path / "command.pid"
    script.write_text(PARENT)
    parent = subprocess.Popen([sys.executable, str(script), str(tmp_path / "bags"), str(tmp_path / "job.log"),
                               str(pid_file)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (pid_file.is_file() and pid_file.read_text()
                                                   and len(_group(int(pid_file.read_text()))) >= 3):
            time.sleep(0.1)  # the command and its two simulator workers
        group = int(pid_file.read_text())
        assert len(_group(group)) >= 3, (tmp_path / "job.log").read_text()
        parent.kill()
        parent.wait(timeout=10)
        deadline = time.monotonic() + 20
        while _group(group) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _group(group), "the command or its workers kept running after the demo was killed"
    finally:
        parent.kill()
        if pid_file.is_file() and pid_file.read_text():
            try:
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass
