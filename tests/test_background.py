"""Commands run one after another at the lowest priority beside real-time work (the demo's data
stage): they run in order, stop at the first failure with its log in the error, and stop() ends the
running one and starts no more."""

from __future__ import annotations

import os
import signal
import sys
import time

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
