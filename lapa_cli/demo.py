"""`lapa demo`: the main job. For now: the scripted expert solves seeded episodes of every task in
the simulator; prints the success table and writes a contact sheet of rollout frames."""

from __future__ import annotations

import time
from pathlib import Path

from lapa_cli import UserError


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run the end-to-end demo on the embedded simulator",
                       description="Scripted-expert rollouts of every task in the simulated arm.")
    p.add_argument("--episodes", type=int, default=10, help="episodes per task (default 10)")
    p.add_argument("--seed", type=int, default=1000, help="first layout seed (default 1000)")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default runs/demo)")


def run(args) -> int:
    if args.episodes < 1:
        raise UserError("--episodes must be at least 1")
    from tqdm import tqdm

    from lapa_sim import tasks
    from lapa_sim.env import TabletopEnv
    from lapa_sim.expert import ScriptedExpert
    from lapa_sim.rollout import run_episode
    from lapa_training.eval_policy import contact_sheet

    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output folder {args.out}: {e}") from None
    env = TabletopEnv()
    rows, sheet = [], []
    start = time.time()
    for task in tasks.TASKS:
        wins = 0
        for i in tqdm(range(args.episodes), desc=f"expert {task}", unit="ep"):
            seed = args.seed + i
            experts = []

            def factory(ep, seed=seed):
                experts.append(ScriptedExpert(ep, seed=seed))
                return experts[-1].act

            result = run_episode(env, factory, task, seed, render_every=10 if i == 0 else 0,
                                 done=lambda: experts[-1].done)
            wins += result.success
            if result.frames:
                sheet.append((result.instruction, result.frames))
        rows.append((task, wins, args.episodes))
    env.close()

    print(f"\nscripted expert, {args.episodes} seeded episodes per task ({time.time() - start:.0f} s):")
    print(f"  {'task':<12}{'success':>10}")
    for task, wins, n in rows:
        print(f"  {task:<12}{wins:>4}/{n:<4} {100.0 * wins / n:5.1f} %")
    path = args.out / "expert_rollouts.png"
    contact_sheet(sheet, path)
    print(f"rollout frames: {path}")
    return 0 if all(w / n >= 0.9 for _, w, n in rows) else 1

