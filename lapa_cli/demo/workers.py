"""Where the demo's commands run: in this process, or side by side in a pool of worker processes
(training runs, evaluation cells). A command is an argv of `lapa`, parsed and run by the CLI's own
parser and handlers (lapa_cli.main), so what the demo records is what ran."""

from __future__ import annotations

import contextlib
import io
import json
import multiprocessing
import os
import time
from pathlib import Path

from lapa_core.child_processes import pool_worker


def run_lapa(argv: list[str], *, quiet: bool = False) -> tuple[object, str]:
    """Run `lapa ARGV` in this process; a UserError propagates. -> (its parsed arguments, what it
    printed when ``quiet``, else "")."""
    from lapa_cli.main import dispatch, parse

    args = parse(argv)
    if not quiet:
        dispatch(args)
        return args, ""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        dispatch(args)
    return args, printed.getvalue()


def _training_job(argv: list[str], threads: int) -> None:
    """One training run (a worker process's job), with its share of the cores."""
    import torch

    torch.set_num_threads(threads)
    run_lapa(argv, quiet=True)


def train_side_by_side(what: str, jobs: dict[str, tuple[list[str], Path, int]]) -> None:
    """Training commands {name: (argv, run directory, steps)}, all at once, each in its own process
    with its share of the cores (tiny models train faster side by side on one thread each than one
    after the other on all); one progress bar over all their steps, read from their metrics files."""
    from tqdm import tqdm

    from lapa_training.trainer import METRICS_FILE

    total = {name: steps for name, (_, _, steps) in jobs.items()}
    bar = tqdm(total=sum(total.values()), desc=f"{what} ({len(jobs)} runs side by side)", unit="step",
               dynamic_ncols=True)
    threads = max(1, (os.cpu_count() or 1) // len(jobs))
    started = time.time()

    def steps_done(name: str) -> int:
        path = Path(jobs[name][1]) / METRICS_FILE
        try:
            if path.stat().st_mtime < started:  # an earlier run's, until this run starts its own
                return 0
            last = path.read_text().rstrip("\n").rsplit("\n", 1)[-1]
            return min(total[name], int(json.loads(last).get("step", 0)))
        except (OSError, ValueError):
            return 0

    t0 = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(len(jobs), initializer=pool_worker) as pool:
        pending = {name: pool.apply_async(_training_job, (argv, threads)) for name, (argv, _, _) in jobs.items()}
        try:
            while pending:
                time.sleep(1.0)
                for name in [n for n, r in pending.items() if r.ready()]:
                    pending.pop(name).get()  # raises the run's error here
                    bar.write(f"   {name}: done after {time.perf_counter() - t0:.0f} s")
                bar.n = sum(total[n] if n not in pending else steps_done(n) for n in jobs)
                bar.refresh()
        finally:
            bar.close()
        pool.close()  # let the workers end on their own (leaving the block would terminate them)
        pool.join()


OFFLINE_KEYS = ("cosine_xy", "cosine_xy_se", "cosine_xy_first", "cosine_xy_first_se", "cosine_xyz", "cosine_xyz_se",
                "episodes")


def _eval_job(job: tuple[str, str, list[str]]) -> tuple[str, str, dict]:
    """One evaluation cell (a worker process's job): ("closed" | "offline", key, argv of `lapa eval
    policy` | `lapa eval actions`); -> (kind, key, the numbers of the report it wrote)."""
    import torch

    kind, key, argv = job
    if multiprocessing.current_process().name != "MainProcess":
        torch.set_num_threads(1)  # the cells share the cores: one thread each
    args, _ = run_lapa(argv, quiet=True)
    report = json.loads((Path(args.out) / "report.json").read_text())
    if kind == "offline":
        return kind, key, {k: report[k] for k in OFFLINE_KEYS}
    return kind, key, {"success_rate": report["success_rate"], "by_task": report["by_task"],
                       "episodes": len(report["episodes"]), "approach": report["approach"],
                       "approach_se": report["approach_se"]}


def evaluate_side_by_side(jobs: list[tuple[str, str, list[str]]], workers: int, done, alongside=None):
    """Evaluation commands (see _eval_job) side by side in `workers` processes (each episode depends
    on its seed alone, so the results do not depend on how many); done(result) gets each result as
    it comes. alongside(), if given, runs in this process meanwhile (the real-time ROS check), with
    the workers at a lower priority so that it keeps its pace. -> what alongside() returned."""
    if workers == 1 or len(jobs) < 2:
        side = alongside() if alongside else None
        for job in jobs:
            done(_eval_job(job))
        return side
    nice = 10 if alongside else 0
    with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs)), initializer=pool_worker,
                                                   initargs=(nice,)) as pool:
        pending = [pool.apply_async(_eval_job, (job,), callback=done) for job in jobs]
        side = alongside() if alongside else None
        for result in pending:
            result.get()  # raises a job's error here; leaving the block then ends the workers
        pool.close()  # else let them end on their own (terminating them leaks semaphores)
        pool.join()
    return side
