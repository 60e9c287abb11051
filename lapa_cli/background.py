"""Commands that run one after another at the lowest CPU priority, beside real-time work.

The demo records its labelled set through ROS in real time, which leaves the cores mostly idle; it
fills them with jobs that do not depend on the recording (generating and ingesting video). Each job
is a chain of `lapa` commands, run as processes of their own: a process can be stopped at once (a
thread running a multiprocessing pool cannot), its output goes to a log file, and its priority is
the lowest (19), so the recording keeps its pace. A thread of ours only waits on the processes.
"""

from __future__ import annotations

import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path

from lapa_core.child_processes import LOWEST_PRIORITY, signal_group, spawn


class BackgroundError(RuntimeError):
    """A command of the chain failed; the message names it and ends with its log's last lines."""


def lapa_argv(*args: str) -> list[str]:
    """argv that runs `lapa <args>` with this interpreter (no dependence on PATH or the entry point)."""
    return [sys.executable, "-m", "lapa_cli.main", *args]


def shown(argv: list[str]) -> str:
    """The user-facing form of a lapa_argv command: `lapa <args>`."""
    return shlex.join(["lapa", *argv[3:]]) if argv[1:3] == ["-m", "lapa_cli.main"] else shlex.join(argv)


def _spawn(argv: list[str], log) -> subprocess.Popen:
    # no parent-death signal: it would end the command before it can end its workers; `lapa` watches
    # for the end of this process itself (end_with_parent_if_asked), and this thread may end first
    return spawn(argv, stdout=log, priority=LOWEST_PRIORITY, parent_death_signal=None)


class LowPriorityCommands:
    """Run ``commands`` (argv lists) in order at the lowest priority until one fails or stop() is
    called; their output goes to ``log``. ``what`` names the job in an error."""

    def __init__(self, what: str, commands: list[list[str]], log: Path):
        self.what, self.commands, self.log = what, [list(c) for c in commands], Path(log)
        self.processes: list[subprocess.Popen] = []  # started so far, in order
        self._failed: tuple[list[str], str] | None = None  # the command that failed, and how
        self._stopped = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"background: {what}", daemon=True)

    def start(self) -> "LowPriorityCommands":
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.log.write_text("")
        self._thread.start()
        return self

    def _run(self) -> None:
        with open(self.log, "a") as log:
            for argv in self.commands:
                with self._lock:
                    if self._stopped:
                        return
                    log.write(f"$ {shown(argv)}\n")
                    log.flush()
                    try:
                        process = _spawn(argv, log)
                    except OSError as e:  # reported by wait(), not lost with this thread
                        self._failed = (argv, f"could not start: {e}")
                        return
                    self.processes.append(process)
                code = process.wait()
                if code != 0:
                    self._failed = (argv, f"exited with status {code}")
                    return

    def stop(self) -> None:
        """Stop the running command and its workers (SIGTERM to its process group) and start no more;
        returns when the chain has ended."""
        with self._lock:
            self._stopped = True
            for process in self.processes:
                signal_group(process, signal.SIGTERM)
        if self._thread.is_alive():
            self._thread.join()

    def wait(self) -> None:
        """Wait for the whole chain; BackgroundError if a command failed."""
        if self._thread.is_alive():
            self._thread.join()
        if self._failed is not None:
            argv, how = self._failed
            tail = self.log.read_text(errors="replace")[-2000:]
            raise BackgroundError(f"{self.what} failed: `{shown(argv)}` {how} (log: {self.log}):\n{tail}")
