"""Child processes that end with the process that started them, whatever ends it.

One helper for every place that starts work of its own: `lapa run`'s nodes, the ROS evaluation's
nodes, the demo's background commands and its worker pools.

    process = spawn(argv, stdout=log)           # leader of its own process group
    stop([process], timeout=15.0)               # SIGINT to its group, then SIGKILL after the timeout
    signal_group(process, signal.SIGTERM)       # it and its workers at once

The parent's side: ``spawn`` starts the child in a process group of its own (a terminal's Ctrl-C
reaches the parent, which stops its children in its own order), tells it its parent's pid
(PARENT_ENV) and, with ``parent_death_signal``, has the kernel signal it when the starting thread
ends (Linux), even by SIGKILL. The child's side: ``end_with_parent_if_asked`` (every `lapa`
command calls it first) and ``pool_worker`` (a multiprocessing pool's initializer) watch the parent
and end the child, and every process of the group it leads, when the parent is gone.

Standard library only: this is the bottom layer.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

LOWEST_PRIORITY = 19
# set in a child's environment: the pid of the process that started it (see end_with_parent_if_asked)
PARENT_ENV = "LAPA_EXIT_WITH_PARENT"
_PR_SET_PDEATHSIG = 1


def _parent_death_hook(sig: int):
    """A preexec_fn that asks the kernel for `sig` when the forking thread ends; None off Linux.
    prctl is looked up here, before the fork: the child only calls it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(_PR_SET_PDEATHSIG, int(sig))


def spawn(argv: list[str], *, stdout=None, stderr=subprocess.STDOUT, env: dict | None = None,
          priority: int = 0, parent_death_signal: int | None = signal.SIGTERM) -> subprocess.Popen:
    """Start ``argv`` as the leader of a process group of its own, stdin closed, output to
    ``stdout``/``stderr`` (files or subprocess.PIPE), with ``env`` (default: ours) plus PARENT_ENV.

    parent_death_signal: sent by the kernel when the thread calling spawn ends (Linux); leave it
    None when that thread may end before the child (it would end the child early), or when the
    child must end its own workers first (a SIGTERM would end it before it can: it then relies on
    end_with_parent_if_asked). priority: a niceness to start at (LOWEST_PRIORITY: only idle cores),
    set after the start, as preexec_fn must stay minimal in a process with threads; the child's
    workers, started after its imports, inherit it."""
    preexec = _parent_death_hook(parent_death_signal) if parent_death_signal is not None else None
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, process_group=0,
                               env={**(os.environ if env is None else env), PARENT_ENV: str(os.getpid())},
                               preexec_fn=preexec)
    if priority:
        try:
            os.setpriority(os.PRIO_PROCESS, process.pid, priority)
        except OSError:
            pass  # it ended already (its exit status tells), or the platform refuses: full priority then
    return process


def signal_group(process: subprocess.Popen, sig: int) -> None:
    """Send ``sig`` to the process group a spawned child leads: it and its workers."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def stop(processes: list[subprocess.Popen], timeout: float, *, sig: int = signal.SIGINT,
         hurry: threading.Event | None = None) -> list[subprocess.Popen]:
    """End spawned children: ``sig`` to each one's group, up to ``timeout`` s for all to exit (less
    once ``hurry`` is set, or at a KeyboardInterrupt), then SIGKILL to whatever is left, and reaped.
    Returns the children that had to be killed."""
    for process in processes:
        signal_group(process, sig)
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in processes) and time.monotonic() < deadline \
                and not (hurry is not None and hurry.is_set()):
            time.sleep(0.02)
    except KeyboardInterrupt:  # a second Ctrl-C: kill at once
        pass
    killed = [p for p in processes if p.poll() is None]
    for process in killed:
        signal_group(process, signal.SIGKILL)
        try:
            process.kill()
        except ProcessLookupError:
            pass
        process.wait()
    return killed


def end_with_parent(parent: int | None = None, poll_s: float = 2.0) -> None:
    """In a child: when ``parent`` (default: the current parent) is gone, end this process and, if
    it leads a process group of its own, every process in it, instead of working on into folders a
    new run may be filling. A daemon thread polls: it works after a SIGKILL of the parent too."""
    parent = os.getppid() if parent is None else parent

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        if os.getpgrp() == os.getpid():  # we lead a group of our own (spawn): ours and our workers'
            os.killpg(os.getpgrp(), signal.SIGTERM)
        os._exit(1)

    threading.Thread(target=watch, name="end-with-parent", daemon=True).start()


def end_with_parent_if_asked(poll_s: float = 2.0) -> None:
    """end_with_parent for a child that ``spawn`` started (PARENT_ENV set to its parent's pid);
    nothing otherwise. The variable is removed, so this process's own children do not watch us."""
    value = os.environ.pop(PARENT_ENV, None)
    if value and value.isdigit():
        end_with_parent(int(value), poll_s)


def pool_worker(nice: int = 0, poll_s: float = 2.0) -> None:
    """A multiprocessing pool's initializer: the worker ends with the process that started the pool
    (a supervisor's SIGTERM or SIGKILL reaches that process, not its workers), at ``nice`` if given."""
    end_with_parent(poll_s=poll_s)
    if nice:
        os.nice(nice)
