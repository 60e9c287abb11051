"""Offline evaluation of a policy against held-out demonstrations: does it move the way the expert
moved, frame by frame?

Closed-loop success (``eval_policy``) is the number that matters, but at small scale it is often 0
for every method, and a few dozen episodes give wide error bars. Token accuracy is no help either:
with equal-frequency bins, near-constant dimensions (roll, pitch) are split into bins of noise.
This report asks a plainer question on every labelled frame of a dataset the policy never trained
on: given the image and the instruction, how well does the predicted end-effector translation
agree with the demonstrator's?

- ``cosine_xy``: cosine between predicted and true horizontal motion (dx, dy) on frames where the
  demonstrator moved at least ``min_motion`` metres sideways that step (chance: 0; 1: same
  direction) -- where to go, the hard part; ``cosine_xyz`` the same in 3-D (dominated by the easy
  up/down); standard errors are over episodes (frames of one episode are not independent);
- ``cosine_xy_first``: ``cosine_xy`` on each episode's first FIRST_STEPS frames only. There the
  arm has not moved yet, so only the image of the scene says where to go. Later frames can be
  predicted from where the arm already is on its way (docs/lab-notes/fixed-start-shortcut.md);
- ``sign_agreement`` per axis on frames where that axis moved at least ``min_motion`` (chance 0.5);
- ``correlation`` per axis (Pearson, all frames);
- ``gripper_agreement``: open/closed as the demonstrator had it.

    report = evaluate_actions(load_policy("runs/finetune/model"), Dataset("data/test"))
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from lapa_core.policy import Policy

AXES = ("dx", "dy", "dz")
MIN_MOTION = 0.003  # m per step (3 cm/s at 10 Hz): slower steps say little about direction
FIRST_STEPS = 5  # frames at the start of each episode scored on their own (cosine_xy_first)


class ActionEvalError(ValueError):
    """The dataset cannot be used for an offline action evaluation (no labelled frames)."""


def evaluate_actions(policy: Policy, dataset, *, split: str | None = None, min_motion: float = MIN_MOTION,
                     progress: bool = True) -> dict[str, Any]:
    """Run policy.act on every labelled frame of `dataset` (a lapa_training Dataset; one split, or all
    for None) with its episode's instruction; compare with the recorded actions. Returns the report
    (see the module docstring): overall, and per task under "by_task"."""
    from tqdm import tqdm

    episodes = [e for e in dataset.split_episodes(split) if e.get("has_actions")]
    if not episodes:
        raise ActionEvalError(f"{dataset.root} has no episodes with actions"
                              f"{'' if split is None else f' in split {split}'}: the offline action "
                              "evaluation needs demonstrations with their actions")
    rows = []  # (task, episode number, predicted (7,), true (7,), step in the episode)
    total = sum(e["length"] for e in episodes)
    with tqdm(total=total, desc="offline action eval", unit="frame", disable=not progress, dynamic_ncols=True) as bar:
        for n, e in enumerate(episodes):
            task = e.get("task") or "unknown"
            for i in range(e["start"], e["start"] + e["length"]):
                true = np.asarray(dataset.actions[i], dtype=np.float64)
                bar.update(1)
                if not np.isfinite(true).all():  # an episode's last frame has no action
                    continue
                policy.reset(e["instruction"])  # every frame on its own: no chunk carried between frames
                pred = np.asarray(policy.act(np.asarray(dataset.frames[i]), e["instruction"]).delta, dtype=np.float64)
                rows.append((task, n, pred, true, i - e["start"]))
    if not rows:
        raise ActionEvalError(f"{dataset.root}: no frame has a finite action")
    report = _metrics(rows, min_motion)
    report["by_task"] = {t: _metrics([r for r in rows if r[0] == t], min_motion) for t in dict.fromkeys(r[0] for r in rows)}
    report.update(dataset=str(dataset.root), split=split or "all", min_motion=min_motion)
    return report


def _metrics(rows: list, min_motion: float) -> dict[str, Any]:
    pred = np.stack([r[2] for r in rows])
    true = np.stack([r[3] for r in rows])
    episode = np.array([r[1] for r in rows])
    first = np.array([r[4] for r in rows]) < FIRST_STEPS
    out: dict[str, Any] = {"frames": len(rows), "episodes": int(len(np.unique(episode)))}
    for key, dims, only in (("xy", slice(0, 2), None), ("xyz", slice(0, 3), None), ("xy_first", slice(0, 2), first)):
        p, t = pred[:, dims], true[:, dims]
        moving = np.linalg.norm(t, axis=1) >= min_motion
        if only is not None:
            moving &= only
        norms = np.linalg.norm(p, axis=1) * np.linalg.norm(t, axis=1)
        cos = np.where(norms > 0, np.sum(p * t, axis=1) / np.maximum(norms, 1e-12), 0.0)
        per_episode = [float(cos[moving & (episode == k)].mean()) for k in np.unique(episode)
                       if (moving & (episode == k)).any()]
        out[f"moving_frames_{key}"] = int(moving.sum())
        out[f"cosine_{key}"] = float(cos[moving].mean()) if moving.any() else float("nan")
        out[f"cosine_{key}_se"] = (float(np.std(per_episode, ddof=1) / np.sqrt(len(per_episode)))
                                   if len(per_episode) > 1 else float("nan"))
    out["sign_agreement"], out["correlation"] = {}, {}
    for j, name in enumerate(AXES):
        big = np.abs(true[:, j]) >= min_motion
        out["sign_agreement"][name] = float(np.mean(np.sign(pred[big, j]) == np.sign(true[big, j]))) if big.any() else float("nan")
        both_vary = pred[:, j].std() > 0 and true[:, j].std() > 0
        out["correlation"][name] = float(np.corrcoef(pred[:, j], true[:, j])[0, 1]) if both_vary else 0.0
    out["gripper_agreement"] = float(np.mean((pred[:, 6] > 0.5) == (true[:, 6] > 0.5)))
    return out


def format_action_report(report: dict[str, Any]) -> str:
    lines = [f"  {'task':<12}{'frames':>7}{'cos(xy)':>13}{'first steps':>14}{'cos(xyz)':>14}{'sign dx':>9}"
             f"{'dy':>6}{'dz':>6}{'gripper':>9}"]
    for task, r in [*report["by_task"].items(), ("all", report)]:
        s = r["sign_agreement"]
        lines.append(f"  {task:<12}{r['frames']:>7}{r['cosine_xy']:>7.2f} ±{r['cosine_xy_se']:<5.2f}"
                     f"{r['cosine_xy_first']:>8.2f} ±{r['cosine_xy_first_se']:<5.2f}"
                     f"{r['cosine_xyz']:>8.2f} ±{r['cosine_xyz_se']:<5.2f}"
                     f"{s['dx']:>9.2f}{s['dy']:>6.2f}{s['dz']:>6.2f}{r['gripper_agreement']:>9.2f}")
    lines.append(f"  (cosines on frames moving >= {1000 * report['min_motion']:.0f} mm/step, ± standard error over "
                 f"episodes; first steps: each episode's first {FIRST_STEPS} frames, before the arm's position gives "
                 "the way away; chance: cosine 0, sign agreement 0.5)")
    return "\n".join(lines)


def write_action_report(report: dict[str, Any], out_dir: str | Path) -> Path:
    """report.json and agreement.png (cosine and per-axis sign agreement per task) into out_dir."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    groups = [*report["by_task"], "all"]
    rows = [report["by_task"][g] if g != "all" else report for g in groups]
    series = [(f"cos({k})", [r[f"cosine_{k}"] for r in rows], [r[f"cosine_{k}_se"] for r in rows]) for k in ("xy", "xyz")]
    series += [(f"sign {a}", [r["sign_agreement"][a] for r in rows], None) for a in AXES]
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(groups), 3.2))
    width = 0.8 / len(series)
    x = np.arange(len(groups))
    for k, (name, values, err) in enumerate(series):
        ax.bar(x + (k - (len(series) - 1) / 2) * width, values, width, yerr=err, capsize=2, label=name)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(x, groups)
    ax.set_ylim(-0.2, 1.0)
    ax.set_title("predicted vs demonstrated end-effector motion", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "agreement.png", dpi=90)
    plt.close(fig)
    return out / "report.json"
