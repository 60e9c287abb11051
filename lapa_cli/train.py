"""`lapa train <job>`: train a model into a run directory.

    lapa train laq --data runs/data/sim --out runs/laq [--preset tiny] [--config laq.yaml]
                   [--steps 3000] [--set train.lr=3e-4 --set model.dim=192] [--resume]
    lapa train pretrain --objective latent --data runs/data/videos --out runs/lapa
    lapa train finetune --init runs/lapa --data runs/data/sim --episodes 10 --out runs/ft --eval-episodes 5

Settings come from the preset, then the --config YAML file (sections model/train/data, see
lapa_training/run_config.py and config/train/), then --set overrides, then the named flags. A run
directory holds run.json, metrics.jsonl, training_curves.png, checkpoints/step-*/ and, when
training ends, model/. Scale out with `accelerate launch -m lapa_cli.main train ...` or
`torchrun --nproc-per-node N -m lapa_cli.main train ...`.
"""

from __future__ import annotations

from pathlib import Path

from lapa_cli import UserError, add_targets, chosen_target


def _say(*lines: str) -> None:
    """Print on the main process only (under accelerate launch / torchrun every process runs this)."""
    from lapa_training.trainer import is_main_process

    if is_main_process():
        for line in lines:
            print(line)


def named_presets() -> dict[str, Path]:
    """The VLA presets of config/train/presets/: name -> file (a pretrained VLM and its training settings)."""
    from lapa_sim.resources import share_file

    folder = share_file("config", "train", "presets")
    return {f.stem: f for f in sorted(folder.glob("*.yaml"))} if folder.is_dir() else {}


def _common(p, presets: tuple[str, ...]) -> None:
    p.add_argument("--data", type=Path, nargs="+", required=True, metavar="DATASET",
                   help="dataset directories (lapa data ingest); several are mixed")
    p.add_argument("--out", type=Path, required=True, help="run directory to write")
    p.add_argument("--config", type=Path, help="YAML settings file with sections model/train/data")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one setting, e.g. train.lr=3e-4 (repeatable)")
    p.add_argument("--preset", choices=presets, metavar="NAME",
                   help=f"model preset: {', '.join(presets)} (default: the config file's, else tiny)")
    p.add_argument("--steps", type=int, help="training steps (train.steps)")
    p.add_argument("--batch-size", type=int, help="global batch size (train.batch_size)")
    p.add_argument("--lr", type=float, help="peak learning rate (train.lr)")
    p.add_argument("--seed", type=int, help="seed of data order and initialisation (train.seed)")
    run = p.add_mutually_exclusive_group()
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    run.add_argument("--overwrite", action="store_true", help="delete the run in --out and start again")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _sections(args, sections=("model", "train", "data")) -> dict:
    from lapa_training.run_config import RunConfigError, load_run_config

    config = load_run_config(args.config, args.overrides, sections)
    named = named_presets().get(args.preset) if args.preset else None
    if named is not None:  # a preset file: its settings first, the --config file and --set over them
        try:
            base = load_run_config(named, (), sections)
        except RunConfigError as e:
            raise UserError(str(e)) from None
        theirs = config["model"].get("preset", base["model"].get("preset"))
        if theirs != base["model"].get("preset"):
            raise UserError(f"--preset {args.preset} is a model.preset {base['model'].get('preset')!r} preset, but the "
                            f"settings ask for model.preset {theirs!r}; leave model.preset out of them")
        merged = {name: {**base[name], **config[name]} for name in sections}
        for key, value in base["model"].items():  # dict settings (processor_overrides) merge key by key
            if isinstance(value, dict) and isinstance(config["model"].get(key), dict):
                merged["model"][key] = {**value, **config["model"][key]}
        config = merged
    elif args.preset:
        config["model"]["preset"] = args.preset
    for flag, key in (("steps", "steps"), ("batch_size", "batch_size"), ("lr", "lr"), ("seed", "seed")):
        if getattr(args, flag) is not None:
            config["train"][key] = getattr(args, flag)
    return config


# ---------------------------------------------------------------- laq
def add_laq_parser(sub) -> None:
    p = sub.add_parser("laq", help="train the latent action quantizer (LAPA stage 1) on frame pairs",
                       description="Train LAQ on the (x_t, x_{t+H}) frame pairs of datasets (with or without "
                                   "actions); validates reconstruction against predicting x_{t+H} = x_t.")
    _common(p, ("tiny", "small", "paper"))


def run_laq(args) -> int:
    from lapa_training.laq.train_laq import train_laq

    config = _sections(args)
    final = train_laq(args.data, args.out, config["model"], config["train"], config["data"], resume=args.resume,
                      overwrite=args.overwrite, progress=not args.quiet)
    _say(f"LAQ model written to {final}; curves in {args.out / 'training_curves.png'}",
         f"next: lapa label --laq {args.out} --data {' '.join(str(d) for d in args.data)}")
    return 0


# ---------------------------------------------------------------- pretrain / finetune (the VLA)
def add_pretrain_parser(sub) -> None:
    p = sub.add_parser("pretrain", help="pretrain the VLA: latent (LAPA), action (ACTIONVLA) or idm (VPT)",
                       description="Pretrain the VLA (vision encoder frozen, language model trained) on --data. "
                                   "latent: predict the LAQ tokens of `lapa label` (LAPA); action: predict the true "
                                   "actions (ACTIONVLA baseline); idm: train an inverse-dynamics model on --labelled, "
                                   "pseudo-label --data with it and predict those (VPT baseline).")
    _common(p, ("tiny", "paper", *named_presets()))
    p.add_argument("--objective", choices=("latent", "action", "idm"), required=True, help="what to predict")
    p.add_argument("--labels", help="latent labels name under <dataset>/labels/ (default laq)")
    p.add_argument("--labelled", type=Path, nargs="+", default=[], metavar="DATASET",
                   help="objective idm: action-labelled datasets the IDM learns from")
    p.add_argument("--episodes", type=int, help="objective idm: labelled episodes the IDM learns from (default all)")


def run_pretrain(args) -> int:
    from lapa_training.vla.train_vla import pretrain

    config = _sections(args)
    if args.labels:
        config["data"]["labels"] = args.labels
    if args.episodes is not None:
        config["data"]["episodes"] = args.episodes
    if args.objective == "idm" and not args.labelled:
        raise UserError("--objective idm needs --labelled DATASET (action-labelled episodes for the IDM)")
    final = pretrain(args.objective, args.data, args.out, config["model"], config["train"], config["data"],
                     labelled=args.labelled, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
    _say(f"pretrained VLA written to {final}; curves in {args.out / 'training_curves.png'}",
         f"next: lapa train finetune --init {args.out} --data <labelled dataset> --out <run>")
    return 0


def add_finetune_parser(sub) -> None:
    p = sub.add_parser("finetune", help="finetune an action head on labelled episodes (no --init: SCRATCH)",
                       description="Train a fresh action head (equal-frequency bins fitted on the labelled data) on "
                                   "the train-split episodes of --data, from a pretrained run (--init) or from "
                                   "scratch; optionally end with a closed-loop evaluation in the simulator.")
    _common(p, ("tiny", "paper", *named_presets()))
    p.add_argument("--init", type=Path, help="pretrained VLA run or checkpoint (default: none, the SCRATCH baseline)")
    p.add_argument("--keep-head", action="store_true",
                   help="go on training --init's own action head and action bins (a run pretrained on actions, "
                        "ACTIONVLA) instead of a fresh head")
    p.add_argument("--episodes", type=int, help="labelled episodes to use (a seeded, nested choice; default all)")
    p.add_argument("--eval-episodes", type=int, default=0,
                   help="after training, run this many closed-loop episodes per sim task (default 0: skip)")
    p.add_argument("--eval-tasks", nargs="+", help="tasks of that evaluation (default all)")


def run_finetune(args) -> int:
    from lapa_training.vla.train_vla import finetune

    config = _sections(args)
    if args.episodes is not None:
        config["data"]["episodes"] = args.episodes
    if args.eval_episodes < 0:
        raise UserError("--eval-episodes must be >= 0")
    final = finetune(args.data, args.out, config["model"], config["train"], config["data"], init=args.init,
                     keep_head=args.keep_head, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
    _say(f"finetuned policy written to {final}; curves in {args.out / 'training_curves.png'}")
    from lapa_training.trainer import is_main_process

    if not is_main_process():
        return 0
    if args.eval_episodes:
        summary = closed_loop_summary(args.out, final, args.eval_tasks, args.eval_episodes, progress=not args.quiet)
        print(f"token accuracy (val) {summary['val_token_accuracy']:.3f} next to success rate "
              f"{summary['success_rate']:.3f}: {args.out / 'summary.json'}")
    else:
        print(f"next: lapa eval policy --policy {final} --out {args.out / 'eval'}")
    return 0


def closed_loop_summary(run_dir: Path, final: Path, task_names, episodes: int, progress: bool) -> dict:
    """Closed-loop evaluation of a finished run, and summary.json with the validation token accuracy
    next to the success rate (token accuracy alone is not the metric)."""
    import json

    from lapa_core.policy import load_policy
    from lapa_sim import tasks
    from lapa_training.data.dataset import Dataset
    from lapa_training.eval_policy import evaluate_policy, format_report
    from lapa_training.trainer import METRICS_FILE, read_metrics

    info = json.loads((run_dir / "run.json").read_text())
    size = int(Dataset(info["data"][0]).frames.shape[1])
    report = evaluate_policy(load_policy(final), task_names or list(tasks.TASKS), episodes, image_size=size,
                             out_dir=run_dir / "eval", progress=progress)
    print(format_report(report))
    val = [r for r in read_metrics(run_dir / METRICS_FILE) if "val_token_accuracy" in r]
    summary = {"val_token_accuracy": val[-1]["val_token_accuracy"] if val else None,
               "val_within_one_bin": val[-1].get("val_within_one_bin") if val else None,
               "success_rate": report.success_rate(), "by_task": report.by_task(),
               "episodes_per_task": episodes, "policy": str(final)}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


ACTIONS = {"laq": (add_laq_parser, run_laq), "pretrain": (add_pretrain_parser, run_pretrain),
           "finetune": (add_finetune_parser, run_finetune)}


def add_parser(sub) -> None:
    add_targets(sub, "train", ACTIONS, "action", "<job>",
                help="train models: laq (stage 1), pretrain (stage 2), finetune (stage 3)",
                description=__doc__.split("\n\n")[0])


def run(args) -> int:
    from lapa_training.checkpoint import CheckpointError
    from lapa_training.run_config import RunConfigError
    from lapa_training.trainer import TrainingError
    from lapa_training.vla.modeling_vla import VLABuildError

    run_job = chosen_target(args, ACTIONS, "action", f"name what to train: {', '.join(ACTIONS)}")
    try:
        return run_job(args)
    except (TrainingError, RunConfigError, CheckpointError, VLABuildError) as e:
        raise UserError(str(e)) from None
