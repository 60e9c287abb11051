"""`lapa demo`: the main job, the whole LAPA story on the embedded simulator.

1. data      demonstrations of the chosen tasks (reach by default): a large set of bags whose actions
             are then hidden (action-free "video"), a small labelled set recorded through the ROS
             recorder, and action-free video of a different embodiment (a floating gripper); the
             recording runs in real time, so the rest is ingested (and generated) beside it, at
             the lowest CPU priority;
2. laq       train LAQ on the robot's action-free video, show its diagnostics, label all video;
3. pretrain  LAPA (latent tokens), ACTIONVLA (the same video with its true actions, 0.6 s at a time,
             the span of a latent action: the paper's upper bound), LAPA on the other embodiment only;
4. finetune  each of them, and SCRATCH, on the same small labelled set (ACTIONVLA goes on training
             its own action head; the trainings of a stage run side by side, one process each);
5. eval      closed loop in the simulator on held-out layouts, in three categories: seen tasks and
             instructions, unseen task/target-colour combinations (each task's held-out colour is
             never a target in any training data), and paraphrased instructions; a table with
             success rate +- standard error, and plots. In-process and lock-step for the table; and
             for SCRATCH, LAPA and ACTIONVLA also through the real ROS path (lapa_sim_arm +
             lapa_policy_server over DDS, one FollowInstruction goal per episode, in real time) on
             each category's first layouts, while the in-process cells run at a lower priority;
             and offline: each method's predicted motion against expert demonstrations of held-out
             seen-category layouts (horizontal direction cosine: cheap, low-variance, and telling
             when every success rate is still 0);
6. sweep     SCRATCH and LAPA finetuned on fewer labelled episodes, evaluated on the seen category.

Every stage writes into --out and is skipped when a previous `lapa demo` finished it with the
same settings (those it and the stages before it read: STAGE_SETTINGS, and the VLA recipe in
config/train/vla_tiny.yaml and actionvla_tiny.yaml from pretraining on; see stage_keys), so a second
run reuses the work and a changed setting redoes only the stages it affects; a redone stage starts
from empty folders. Every step of a stage is a `lapa` command, run as recorded in COMMANDS.md.
`--quick` runs the same path at toy size in a few minutes (the test suite runs it).

The package: settings.py (DemoSettings, the recipe files, seed_ranges, stage_keys), stages.py (the
Demo and its stages), workers.py (where commands run: here, or side by side in worker processes),
report.py (tables, RESULTS.md, COMMANDS.md, plots).
"""

from __future__ import annotations

from pathlib import Path

from lapa_cli import UserError
from lapa_cli.demo.settings import ACTIONVLA_RECIPE, CATEGORIES, HEAD_ONLY, OTHER_EMBODIMENT_LOOK, STAGE_SETTINGS, \
    STAGES, TASKS, VLA_RECIPE, DemoSettings, Recipe, SeedRange, seed_ranges, stage_keys  # noqa: F401 (the API)


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run the end-to-end demo on the embedded simulator",
                       description=__doc__.split("\n\n")[0] + " Stages: " + ", ".join(STAGES) + ".")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default runs/demo)")
    p.add_argument("--quick", action="store_true", help="toy size: the same path in a few minutes")
    p.add_argument("--tasks", nargs="+", choices=TASKS, metavar="TASK",
                   help=f"simulator tasks (default: reach; {', '.join(TASKS)} is a longer run)")
    p.add_argument("--eval-episodes", type=int, help="closed-loop episodes per task and instruction set")
    p.add_argument("--seed", type=int, default=0, help="seed of data layouts and training (default 0)")


def run(args) -> int:
    settings = DemoSettings.quick() if args.quick else DemoSettings()
    settings.seed = args.seed
    if args.seed < 0:
        raise UserError("--seed must not be negative")
    if args.tasks:
        settings.tasks = tuple(dict.fromkeys(args.tasks))
    if args.eval_episodes is not None:
        if args.eval_episodes < 1:
            raise UserError("--eval-episodes must be at least 1")
        settings.eval_episodes = args.eval_episodes
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output folder {args.out}: {e.strerror}") from None
    from lapa_cli.background import BackgroundError
    from lapa_cli.demo.stages import Demo
    from lapa_policy_node.collect import CollectError
    from lapa_policy_node.ros_eval import RosEvalError
    from lapa_training.checkpoint import CheckpointError
    from lapa_training.data.errors import IngestError
    from lapa_training.laq.evaluate_laq import LAQEvalError
    from lapa_training.run_config import RunConfigError
    from lapa_training.trainer import TrainingError

    try:
        demo = Demo(args.out.resolve(), settings)
    except RunConfigError as e:  # a recipe file in config/train/ the user edited
        raise UserError(str(e)) from None
    try:
        return demo.run()
    except (UserError, CollectError, TrainingError, CheckpointError, IngestError, LAQEvalError, BackgroundError,
            RosEvalError) as e:
        raise UserError(f"{e} (finished stages are kept in {args.out}; run again to continue)") from None


def __getattr__(name: str):
    if name == "Demo":  # lazily: `lapa --help` does not import the stages
        from lapa_cli.demo.stages import Demo

        return Demo
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
