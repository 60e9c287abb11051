"""The demo's report: the tables it prints, RESULTS.md, COMMANDS.md and the plots."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from lapa_cli.demo.settings import CATEGORIES, CATEGORY_TITLES, STAGES, TASKS


def write_results(out: Path, settings, state: dict, results: dict, sweep: dict) -> None:
    """RESULTS.md: the tables, the plots, the machine and the stage wall times of this run."""
    import platform

    import torch

    seconds = state.get("seconds", {})
    laq = json.loads((out / "laq_eval" / "report.json").read_text())
    from lapa_training.laq.evaluate_laq import format_summary

    lines = ["# lapa demo results", "",
             f"Command: `lapa demo --out {out}{' --seed ' + str(settings.seed) if settings.seed else ''}` "
             f"(settings: `{json.dumps(asdict(settings))}`)", "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
             f"{'CUDA ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}; "
             f"torch {torch.__version__}, Python {platform.python_version()}", "",
             "## Closed-loop success", "", "```", format_table(results), "```", "",
             "![success](eval/success.png)", "", "## Fewer labels", "", "```", format_sweep(sweep).strip("\n"),
             "```", "", "![sweep](sweep/sweep.png)", "", "## LAQ", "", "```", format_summary(laq), "```", "",
             "## Stage wall times", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {stage} | {seconds.get(stage, float('nan')):.0f} |" for stage in STAGES]
    lines += [f"| total | {sum(seconds.get(stage, 0.0) for stage in STAGES):.0f} |", ""]
    step_seconds = state.get("step_seconds", {})
    steps = {what: sec for stage in STAGES for what, sec in step_seconds.get(stage, {}).items()}
    if steps:
        lines += ["Within the stages: " + "; ".join(f"{what} {sec:.0f} s" for what, sec in steps.items()) + ".", ""]
    lines += ["Rollout frames: `eval/<method>/<category>/rollouts.png`; training curves: "
              "`<stage>/<run>/training_curves.png`; every stage as a command: `COMMANDS.md`.", ""]
    (out / "RESULTS.md").write_text("\n".join(lines))


def write_commands(out: Path, state: dict) -> None:
    lines = ["# The demo's stages as `lapa` commands", "",
             "Run from the repository root after `./setup.sh`: the commands `lapa demo` ran, stage by stage "
             "(lines starting with # say how it ran them).", "", "```"]
    for stage in STAGES:
        lines += state.get("commands", {}).get(stage, [])
    lines += ["```", ""]
    (out / "COMMANDS.md").write_text("\n".join(lines))


def standard_error(p: float, n: int) -> float:
    return (p * (1 - p) / n) ** 0.5 if n else float("nan")


def _cell(result: dict) -> str:
    p = result["success_rate"]
    return f"{100 * p:5.1f} ± {100 * standard_error(p, result['episodes']):4.1f} %"


def format_table(results: dict) -> str:
    categories = results.get("categories", list(CATEGORIES))
    lines = [f"  {'method':<24}" + "".join(f"{CATEGORY_TITLES.get(c, c):>16}" for c in categories)
             + f"{'offline cos(xy)':>17}{'first steps':>14}{'val token acc':>15}"]
    for name, row in results["methods"].items():
        acc = row.get("val_token_accuracy")
        lines.append(f"  {name:<24}" + "".join(f"{_cell(row[c]) if c in row else '-':>16}" for c in categories)
                     + f"{_offline(row.get('offline')):>17}{_offline(row.get('offline'), '_first'):>14}"
                     + f"{'' if acc is None else f'{acc:.3f}':>15}")
    tasks = results.get("tasks", TASKS)
    lines.append(f"  ({results['episodes_per_cell']} episodes per cell over {len(tasks)} task(s); ± is one standard "
                 f"error; held-out layouts)")
    if any(row[c].get("approach") is not None for row in results["methods"].values() for c in categories if c in row):
        lines.append("\n  target approach in the same episodes (how much of its starting distance to the named block "
                     "the gripper closed; 0 to 1, ± one standard error):")
        lines.append(f"  {'method':<24}" + "".join(f"{CATEGORY_TITLES.get(c, c):>16}" for c in categories))
        for name, row in results["methods"].items():
            lines.append(f"  {name:<24}" + "".join(f"{_approach(row.get(c)):>16}" for c in categories))
    offline = next((r["offline"] for r in results["methods"].values() if r.get("offline")), None)
    if offline:
        lines.append(f"  (offline cos(xy): predicted vs expert horizontal motion on {offline['episodes']} held-out "
                     f"demonstrations, every frame; first steps: each episode's first frames only, before the "
                     f"arm's position gives the way away; chance 0, ± over episodes)")
    if results.get("ros"):
        lines.append("\n  through the ROS action server (sim arm + policy server over DDS, real time): successes, in "
                     "brackets the same layouts' in process:")
        lines.append(f"  {'method':<24}" + "".join(f"{CATEGORY_TITLES.get(c, c):>16}" for c in categories)
                     + f"{'act p50/p99 ms':>17}")
        for name, row in results["ros"].items():
            cells = row.get("categories") or {"seen": row}  # an earlier version's: the seen category only
            lines.append(f"  {name:<24}" + "".join(f"{_ros_cell(cells.get(c)):>16}" for c in categories)
                         + f"{row['act_ms_p50']:>10.1f}/{row['act_ms_p99']:.1f}")
    return "\n".join(lines)


def _ros_cell(cell: dict | None) -> str:
    if not cell:
        return "-"
    if "successes" not in cell:  # an earlier version's cell: rates
        return f"{100 * cell['success_rate']:.0f} % of {cell['episodes']}"
    same = cell.get("in_process_successes")
    return f"{cell['successes']}/{cell['episodes']}" + ("" if same is None else f" ({same}/{cell['episodes']})")


def _approach(cell: dict | None) -> str:
    if not cell or cell.get("approach") is None:
        return "-"
    return f"{cell['approach']:.2f} ± {cell['approach_se']:.2f}"


def _offline(cell: dict | None, which: str = "") -> str:
    key = f"cosine_xy{which}"
    return "-" if not cell or key not in cell else f"{cell[key]:.2f} ± {cell[key + '_se']:.2f}"


def format_sweep(sweep: dict) -> str:
    names = list(sweep["points"][0]["methods"]) if sweep["points"] else []
    lines = [f"\n  labelled-episode sweep (seen category, {sweep['episodes_per_point']} episodes per point; "
             f"{sweep['video_episodes']} action-free video episodes; success, target approach, offline cos(xy))",
             f"  {'labelled episodes':<24}" + "".join(f"{n:>16}{'':>28}" for n in names)]
    for point in sweep["points"]:
        label = f"{point['labelled_episodes']} ({point['percent_of_video']:.1f} % of video)"
        lines.append(f"  {label:<24}" + "".join(f"{_cell(point['methods'][n]):>16}"
                                                f"{_approach(point['methods'][n]):>14}"
                                                f"{_offline(point['methods'][n].get('offline')):>14}" for n in names))
    return "\n".join(lines)


def success_plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(results["methods"])
    categories = results.get("categories", list(CATEGORIES))
    width = 0.8 / len(categories)
    fig, ax = plt.subplots(figsize=(1.8 * len(names) + 2, 3.6))
    x = np.arange(len(names))
    for k, category in enumerate(categories):
        cells = [results["methods"][m].get(category, {"success_rate": float("nan"), "episodes": 0}) for m in names]
        ax.bar(x + (k - (len(categories) - 1) / 2) * width, [100 * c["success_rate"] for c in cells], width,
               yerr=[100 * standard_error(c["success_rate"], c["episodes"]) for c in cells], capsize=3,
               label=CATEGORY_TITLES.get(category, category))
    ax.set_xticks(x, names)
    ax.set_ylabel("success rate [%]")
    ax.set_ylim(0, 100)
    ax.legend()
    ax.set_title("closed-loop success in the simulator (held-out layouts)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def sweep_plot(sweep: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    counts = [p["labelled_episodes"] for p in sweep["points"]]
    for name in (sweep["points"][0]["methods"] if sweep["points"] else []):
        cells = [p["methods"][name] for p in sweep["points"]]
        ax.errorbar(counts, [100 * c["success_rate"] for c in cells], marker="o", capsize=3, label=name,
                    yerr=[100 * standard_error(c["success_rate"], c["episodes"]) for c in cells])
    ax.set_xlabel("labelled finetuning episodes")
    ax.set_ylabel("success rate [%] (seen)")
    ax.set_ylim(0, 100)
    ax.legend()
    ax.set_title("fewer labels: SCRATCH vs LAPA")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
