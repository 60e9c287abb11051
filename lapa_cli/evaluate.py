"""`lapa eval <target>`: diagnostics reports of trained models.

    lapa eval laq --checkpoint runs/laq --data runs/data/sim --out runs/eval/laq
    lapa eval policy --policy runs/finetune --episodes 10 --out runs/eval/policy

Each target is an (add_parser, run) pair in ACTIONS; add one there to add a target. Heavy imports
happen inside run functions so `lapa --help` stays instant. Bad input (a missing or damaged
checkpoint, a dataset that is not one or does not fit the model, an empty split) becomes a
UserError: one line, exit status 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from lapa_cli import UserError, add_targets, chosen_target, torch_device


# ---------------------------------------------------------------- laq
def add_laq_parser(sub) -> None:
    p = sub.add_parser(
        "laq", help="diagnostics of a trained LAQ model: reconstruction, codebook, action probe, token grid",
        description="Evaluate a LAQ checkpoint on a dataset split and write report.json, report.md and plots to "
                    "--out: reconstruction error against copying x_t, codebook use and perplexity per token "
                    "position, linear and MLP probes from the latent tokens to the ground-truth actions (against "
                    "shuffled tokens), and the grid of scenes x token sequences decoded.")
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="LAQ training run (its model/ or newest checkpoint) or checkpoint directory")
    p.add_argument("--data", type=Path, required=True, help="dataset directory (lapa data ingest)")
    p.add_argument("--out", type=Path, required=True, help="directory for the report (created; files replaced)")
    p.add_argument("--split", choices=("train", "val", "test"), default="val",
                   help="split to evaluate on (default val)")
    p.add_argument("--probe-split", choices=("train", "val", "test"), default="train",
                   help="split the action probes are fitted on (default train)")
    p.add_argument("--max-pairs", type=int, default=2000,
                   help="evaluate at most this many frame pairs per split, a seeded random subset (default 2000)")
    p.add_argument("--batch-size", type=int, default=64, help="frame pairs per forward pass (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the pair subset, probes and grid (default 0)")
    p.add_argument("--device", default="auto", help="torch device: auto (cuda when available), cpu, cuda, cuda:1, ...")


def run_laq(args) -> int:
    from lapa_training.checkpoint import CheckpointError
    from lapa_training.data.dataset import Dataset
    from lapa_training.data.errors import IngestError
    from lapa_training.laq.loading import load_laq
    from lapa_training.laq.evaluate_laq import MIN_EVAL_PAIRS, LAQEvalError, evaluate_laq, format_summary
    from lapa_training.trainer import latest_model_dir

    if args.max_pairs < MIN_EVAL_PAIRS:
        raise UserError(f"--max-pairs must be at least {MIN_EVAL_PAIRS}, not {args.max_pairs}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, not {args.batch_size}")
    if not args.checkpoint.exists():
        raise UserError(f"checkpoint not found: {args.checkpoint}")
    device = torch_device(args.device)
    try:
        dataset = Dataset(args.data)
    except IngestError as e:
        raise UserError(" ".join(str(e).split())) from None
    try:
        checkpoint = latest_model_dir(args.checkpoint)
        model = load_laq(checkpoint, map_location=device)
    except CheckpointError as e:
        raise UserError(" ".join(str(e).split())) from None
    try:
        report = evaluate_laq(model, dataset, args.out, split=args.split, probe_split=args.probe_split,
                              max_pairs=args.max_pairs, batch_size=args.batch_size, seed=args.seed,
                              progress=sys.stderr.isatty(), info={"checkpoint": str(checkpoint)})
    except LAQEvalError as e:
        raise UserError(" ".join(str(e).split())) from None
    except OSError as e:  # output directory not writable
        raise UserError(f"cannot write {e.filename}: {e.strerror}") from None
    print(format_summary(report))
    print(f"report: {args.out / report['files']['markdown']} (numbers in {args.out / report['files']['json']})")
    return 0


# ---------------------------------------------------------------- policy
def add_policy_parser(sub) -> None:
    p = sub.add_parser(
        "policy", help="closed-loop success rate of a policy in the simulator",
        description="Run a policy checkpoint (finetuned VLA, or a constant policy for bring-up) on seeded episodes "
                    "of the simulator's tasks, through the same delta->twist conversion and motion limits as the "
                    "ROS policy server; write report.json and rollouts.png to --out.")
    p.add_argument("--policy", type=Path, required=True,
                   help="policy checkpoint (a directory with config.json), or a training run (its model/)")
    p.add_argument("--tasks", nargs="+", default=None, metavar="TASK", help="tasks (default: all)")
    p.add_argument("--episodes", type=int, default=10, help="episodes per task (default 10)")
    p.add_argument("--seed", type=int, default=None,
                   help="first layout seed (default 10000000: no `lapa demo` trains on it)")
    p.add_argument("--image-size", type=int, default=128, help="camera image size in px (default 128)")
    p.add_argument("--instructions", choices=("train", "paraphrase"), default="train",
                   help="instruction templates: as in training, or unseen paraphrases (default train)")
    p.add_argument("--combinations", choices=("all", "seen", "unseen"), default="all",
                   help="task/target-colour combinations: all (default), seen, or unseen (each task's held-out "
                        "target colour, kept out of training data made with --combinations seen)")
    p.add_argument("--ros", action="store_true",
                   help="through the real ROS path: lapa_sim_arm and lapa_policy_server as processes over DDS, in "
                        "real time, one FollowInstruction goal per episode (default: in-process, lock-step); "
                        "ROS arguments for both nodes go after --ros-args, e.g. --ros-args -p "
                        "lapa_policy_server:camera_timeout:=1.0")
    p.add_argument("--out", type=Path, required=True, help="directory for the report")


def run_policy(args) -> int:
    from lapa_sim import tasks
    from lapa_training.eval_policy import EVAL_SEED, evaluate_policy, format_report

    if args.episodes < 1:
        raise UserError("--episodes must be at least 1")
    ros_args = getattr(args, "ros_args", None) or []
    if ros_args and not args.ros:
        raise UserError("--ros-args apply to the nodes of an evaluation through ROS: add --ros")
    if args.image_size < 16:
        raise UserError("--image-size must be at least 16")
    task_names = args.tasks or list(tasks.TASKS)
    unknown = [t for t in task_names if t not in tasks.TASKS]
    if unknown:
        raise UserError(f"unknown task(s) {', '.join(unknown)}; tasks are {', '.join(tasks.TASKS)}")
    path, policy = _load_policy_arg(args.policy)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {args.out}: {e.strerror}") from None
    first_seed = EVAL_SEED if args.seed is None else args.seed
    if args.ros:
        from lapa_policy_node.ros_eval import RosEvalError, evaluate_over_ros

        jobs = [(task, seed) for task in task_names
                for seed in tasks.episode_seeds(task, first_seed, args.episodes, args.combinations)]
        try:
            report = evaluate_over_ros(path, jobs, image_size=args.image_size, instruction_set=args.instructions,
                                       out_dir=args.out, progress=sys.stderr.isatty(), ros_args=ros_args)
        except RosEvalError as e:
            raise UserError(" ".join(str(e).split())) from None
    else:
        report = evaluate_policy(policy, task_names, args.episodes, image_size=args.image_size,
                                 first_seed=first_seed, instruction_set=args.instructions, out_dir=args.out,
                                 progress=sys.stderr.isatty(), combinations=args.combinations)
    print(f"closed-loop evaluation of {path}{' through ROS' if args.ros else ''}, {args.episodes} episode(s) per "
          f"task, {args.instructions} instructions, {args.combinations} combinations:")
    print(format_report(report))
    print(f"report: {args.out / 'report.json'}" + ("" if args.ros else f", rollouts: {args.out / 'rollouts.png'}"))
    return 0


def add_actions_parser(sub) -> None:
    p = sub.add_parser(
        "actions", help="offline: a policy's predicted motion against held-out demonstrations",
        description="Run a policy checkpoint on every labelled frame of a dataset it did not train on (with each "
                    "episode's instruction) and compare its end-effector translation with the demonstrator's: "
                    "cosine, per-axis sign agreement and correlation, gripper agreement, per task. A cheap, "
                    "low-variance companion to the closed-loop success rate. Writes report.json and agreement.png.")
    p.add_argument("--policy", type=Path, required=True,
                   help="policy checkpoint (a directory with config.json), or a training run (its model/)")
    p.add_argument("--data", type=Path, required=True, help="dataset with actions (lapa data ingest)")
    p.add_argument("--split", choices=("train", "val", "test"), default=None,
                   help="only this split of --data (default: every episode)")
    p.add_argument("--out", type=Path, required=True, help="directory for the report")


def run_actions(args) -> int:
    from lapa_training.data.dataset import Dataset
    from lapa_training.data.errors import IngestError
    from lapa_training.eval_actions import ActionEvalError, evaluate_actions, format_action_report, write_action_report

    path, policy = _load_policy_arg(args.policy)
    try:
        dataset = Dataset(args.data)
        report = evaluate_actions(policy, dataset, split=args.split, progress=sys.stderr.isatty())
        written = write_action_report(report, args.out)
    except (IngestError, ActionEvalError) as e:
        raise UserError(" ".join(str(e).split())) from None
    except OSError as e:
        raise UserError(f"cannot write the report to {args.out}: {e.strerror}") from None
    print(f"offline action agreement of {path} on {args.data}{'' if args.split is None else f' ({args.split})'}:")
    print(format_action_report(report))
    print(f"report: {written}, plot: {args.out / 'agreement.png'}")
    return 0


def _load_policy_arg(path: Path):
    """--policy: a checkpoint directory, or a training run whose model/ is one -> (path, policy)."""
    from lapa_core.policy import PolicyLoadError, load_policy
    from lapa_training.checkpoint import CheckpointError

    if (path / "model" / "config.json").is_file() and not (path / "config.json").is_file():
        path = path / "model"
    try:
        return path, load_policy(path)
    except (PolicyLoadError, CheckpointError) as e:
        raise UserError(" ".join(str(e).split())) from None


# ---------------------------------------------------------------- the `lapa eval` command
ACTIONS: dict[str, tuple[Callable, Callable[..., int]]] = {
    "laq": (add_laq_parser, run_laq),
    "policy": (add_policy_parser, run_policy),
    "actions": (add_actions_parser, run_actions),
}


def add_parser(sub) -> None:
    add_targets(sub, "eval", ACTIONS, "eval_command", "<target>", help="evaluate trained models: diagnostics reports",
                description="Diagnostics reports of trained models. Targets: " + ", ".join(ACTIONS) + ".")


def run(args) -> int:
    run_target = chosen_target(args, ACTIONS, "eval_command",
                               f"give a target: {', '.join(ACTIONS)} (see lapa eval --help)")
    return int(run_target(args) or 0)
