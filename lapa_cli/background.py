"""Commands that run one after another at the lowest CPU priority, beside real-time work.

The demo records its labelled set through ROS in real time, which leaves the cores mostly idle; it
fills them with jobs that do not depend on the recording (generating and ingesting video). Each job
is a chain of `lapa` commands, run as processes of their own: a process can be stopped at once (a
thread running a multiprocessing pool cannot), its output goes to a log file, and its priority is
the lowest (19), so the recording keeps its pace. A thread of ours only waits on the processes.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

LOWEST_PRIORITY = 19
# set in a command's environment: the pid of the process that started it (see end_with_parent_if_asked)
PARENT_ENV = "LAPA_EXIT_WITH_PARENT"


class BackgroundError(RuntimeError):
    """A command of the chain failed; the message names it and ends with its log's last lines."""


def lapa_argv(*args: str) -> list[str]:
    """argv that runs `lapa <args>` with this interpreter (no dependence on PATH or the entry point)."""
    return [sys.executable, "-m", "lapa_cli.main", *args]


def shown(argv: list[str]) -> str:
    """The user-facing form of a lapa_argv command: `lapa <args>`."""
    return shlex.join(["lapa", *argv[3:]]) if argv[1:3] == ["-m", "lapa_cli.main"] else shlex.join(argv)


def end_with_parent_if_asked(poll_s: float = 2.0) -> None:
    """In a `lapa` command started by LowPriorityCommands (PARENT_ENV set): when the process that
    started it ends, even killed by SIGKILL, which leaves it no chance to stop its commands, end this
    command and its workers (its process group), instead of writing on into folders that a new run
    may be filling. `lapa` calls this first thing."""
    value = os.environ.pop(PARENT_ENV, None)  # popped: our own workers and commands do not watch us
    if not value or not value.isdigit():
        return
    parent = int(value)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        if os.getpgrp() == os.getpid():  # we lead a group of our own (start_new_session): ours and our workers'
            os.killpg(os.getpgrp(), signal.SIGTERM)
        os._exit(1)

    threading.Thread(target=watch, name="end-with-parent", daemon=True).start()


def _spawn(argv: list[str], log) -> subprocess.Popen:
    # a process group of its own: stop() ends the command and its workers at once (a terminal's Ctrl-C
    # reaches our process, which stops it)
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True, env={**os.environ, PARENT_ENV: str(os.getpid())})
    try:  # after the start, not preexec_fn (unsafe in a process with threads); its workers, started
        os.setpriority(os.PRIO_PROCESS, process.pid, LOWEST_PRIORITY)  # after its imports, inherit it
    except OSError:
        pass  # it ended already (its exit status tells), or the platform refuses: full priority then
    return process


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
                if process.poll() is None:
                    try:
                        os.killpg(process.pid, signal.SIGTERM)
                    except ProcessLookupError:
                        pass
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
