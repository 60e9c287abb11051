"""Closed-loop evaluation of a policy in the simulator: the number that matters (task success), not
token accuracy.

Every step goes the way it goes on the arm: the camera image and the instruction in, the same
controller step as the ROS policy server (``lapa_core.controller``: ``policy.act`` -> 7-D delta ->
twist -> speed, acceleration and workspace limits), then the simulated MoveIt-Servo-like
controller. A NaN or a raising policy ends the episode as a failure and is counted, never crashes
the evaluation.

    report = evaluate_policy(load_policy("runs/finetune/model"), ["reach", "push"], episodes=10)
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lapa_core.policy import Policy
from lapa_core.controller import Controller
from lapa_core.safety import MotionLimits, UnsafeCommand

# layouts of evaluation episodes start here: above every layout `lapa demo` makes data from for its seeds
# 0-99 (lapa_cli/demo/settings.py seed_ranges; tests/test_demo_settings.py checks it)
EVAL_SEED = 10_000_000


@dataclass
class EpisodeOutcome:
    task: str
    seed: int
    instruction: str
    success: bool
    steps: int
    seconds: float
    failure: str | None = None  # why the episode ended early (policy error / unsafe output)
    # 1 - (closest horizontal gripper-to-target-block distance) / (that distance at the start): how much
    # of the way to the instruction's block the gripper got (every task starts by going there). 0 for
    # a policy that does not move or moves away, 1 for reaching it; continuous where success is rare
    approach: float | None = None


@dataclass
class PolicyReport:
    episodes: list[EpisodeOutcome] = field(default_factory=list)
    act_ms_p50: float = 0.0
    act_ms_p99: float = 0.0
    wall_seconds: float = 0.0

    def success_rate(self, task: str | None = None) -> float:
        eps = [e for e in self.episodes if task is None or e.task == task]
        return float(np.mean([e.success for e in eps])) if eps else float("nan")

    def approach(self, task: str | None = None) -> tuple[float, float]:
        """Mean target approach and its standard error over the episodes that measured it."""
        values = [e.approach for e in self.episodes if e.approach is not None and (task is None or e.task == task)]
        if not values:
            return float("nan"), float("nan")
        se = float(np.std(values, ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan")
        return float(np.mean(values)), se

    def by_task(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for task in dict.fromkeys(e.task for e in self.episodes):
            eps = [e for e in self.episodes if e.task == task]
            out[task] = {"episodes": len(eps), "successes": int(sum(e.success for e in eps)),
                         "success_rate": self.success_rate(task),
                         "failures": int(sum(e.failure is not None for e in eps)),
                         "approach": self.approach(task)[0]}
        return out

    def finish(self, act_seconds: list[float], started: float) -> None:
        """Set the act-time percentiles and the wall time (from perf_counter `started`)."""
        if act_seconds:
            self.act_ms_p50 = float(np.percentile(act_seconds, 50) * 1e3)
            self.act_ms_p99 = float(np.percentile(act_seconds, 99) * 1e3)
        self.wall_seconds = time.perf_counter() - started

    def to_dict(self) -> dict[str, Any]:
        approach, approach_se = self.approach()
        return {"success_rate": self.success_rate(), "approach": approach, "approach_se": approach_se,
                "by_task": self.by_task(), "act_ms_p50": self.act_ms_p50,
                "act_ms_p99": self.act_ms_p99, "wall_seconds": self.wall_seconds,
                "episodes": [asdict(e) for e in self.episodes]}


def evaluate_policy(policy: Policy, task_names: list[str] | tuple[str, ...], episodes: int, *,
                    first_seed: int = EVAL_SEED, image_size: int = 128, instruction_set: str = "train",
                    limits: MotionLimits | None = None, out_dir: str | Path | None = None,
                    progress: bool = True, keep_frames: int = 1, combinations: str = "all",
                    linear_scale: float = 1.0, angular_scale: float = 1.0) -> PolicyReport:
    """Run `episodes` seeded episodes of each task (seeds from first_seed on, only those of
    `combinations`: see lapa_sim.tasks.episode_seeds); with out_dir, write report.json and a contact
    sheet (rollouts.png) of the first `keep_frames` episodes of every task. The speed scales multiply
    the policy's deltas as the policy server's parameters of the same names do."""
    from tqdm import tqdm

    from lapa_sim import tasks
    from lapa_sim.env import TabletopEnv

    for task in task_names:
        if task not in tasks.TASKS:
            raise ValueError(f"unknown task {task!r}; tasks are {', '.join(tasks.TASKS)}")
    if episodes < 1:
        raise ValueError("episodes must be >= 1")
    rate = float(policy.control_rate)
    period = 1.0 / rate
    controller = Controller(policy, limits or MotionLimits(), rate, linear_scale=linear_scale,
                            angular_scale=angular_scale)
    env = TabletopEnv(image_size=(image_size, image_size))
    report, act_seconds, sheet = PolicyReport(), [], []
    t_start = time.perf_counter()
    jobs = [(task, seed) for task in task_names for seed in tasks.episode_seeds(task, first_seed, episodes, combinations)]
    try:
        bar = tqdm(jobs, desc="closed-loop eval", unit="ep", disable=not progress, dynamic_ncols=True)
        for n, (task, seed) in enumerate(bar):
            obs = env.reset(task, seed, instruction_set)
            instruction = env.episode.instruction
            controller.reset(instruction)
            frames, failure, success, steps = [], None, False, 0
            start = closest = _target_distance(env.episode, obs)
            record = (n % episodes) < keep_frames
            for steps in range(1, int(round(tasks.MAX_SECONDS[task] / period)) + 1):
                image = env.render()
                if record and (steps - 1) % 10 == 0:
                    frames.append(image)
                try:
                    proposal = controller.propose(image, instruction)
                    act_seconds.append(proposal.act_seconds)
                    command = controller.limit(proposal, obs.tcp_pos)
                except UnsafeCommand as e:
                    failure = f"unsafe policy output: {e}"
                except Exception as e:  # a policy bug ends this episode, not the evaluation
                    failure = f"policy raised {type(e).__name__}: {e}"
                if failure:
                    break
                obs = env.step(command.twist, 1.0 - command.closure, period)
                closest = min(closest, _target_distance(env.episode, obs))
                if obs.success:
                    success = True
                    break
            if record:
                frames.append(env.render())
                sheet.append((f"{task} seed {seed}: {'success' if success else 'fail'} - {instruction}", frames))
            report.episodes.append(EpisodeOutcome(task, seed, instruction, success, steps, steps * period, failure,
                                                  approach=1.0 - closest / start if start > 0 else None))
            bar.set_postfix(success=f"{report.success_rate():.0%}", refresh=False)
    finally:
        env.close()
    report.finish(act_seconds, t_start)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        if sheet:
            contact_sheet(sheet, out / "rollouts.png")
    return report


def _target_distance(episode, obs) -> float:
    """Horizontal distance (m) from the gripper to the block the instruction names."""
    return float(np.linalg.norm(obs.tcp_pos[:2] - obs.block_pos[episode.target_block][:2]))


def contact_sheet(rows: list[tuple[str, list[np.ndarray]]], path: Path) -> None:
    """One row of frames per episode, titled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = max(len(frames) for _, frames in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.6 * cols, 1.9 * len(rows)), squeeze=False)
    for r, (title, frames) in enumerate(rows):
        for c in range(cols):
            axes[r][c].axis("off")
            if c < len(frames):
                axes[r][c].imshow(frames[c])
        axes[r][0].set_title(title, loc="left", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def format_report(report: PolicyReport) -> str:
    lines = [f"  {'task':<12}{'success':>20}{'target approach':>17}"]
    for task, row in report.by_task().items():
        extra = f"  ({row['failures']} ended by policy errors)" if row["failures"] else ""
        approach = "-" if np.isnan(row["approach"]) else f"{row['approach']:.2f}"
        lines.append(f"  {task:<12}{row['successes']:>6}/{row['episodes']:<4}{100 * row['success_rate']:6.1f} %"
                     f"{approach:>17}{extra}")
    lines.append("  (target approach: how much of its starting distance to the named block the gripper closed, "
                 "0 to 1)")
    lines.append(f"  policy.act p50 {report.act_ms_p50:.1f} ms, p99 {report.act_ms_p99:.1f} ms; "
                 f"{report.wall_seconds:.0f} s in all")
    return "\n".join(lines)
