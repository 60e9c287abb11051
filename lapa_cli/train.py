"""`lapa train <job>`: train a model into a run directory.

    lapa train laq --data runs/data/sim --out runs/laq [--preset tiny] [--config laq.yaml]
                   [--steps 3000] [--set train.lr=3e-4 --set model.dim=192] [--resume]

Settings come from the preset, then the --config YAML file (sections model/train/data, see
lapa_training/run_config.py and config/train/), then --set overrides, then the named flags. A run
directory holds run.json, metrics.jsonl, training_curves.png, checkpoints/step-*/ and, when
training ends, model/. Scale out with `accelerate launch -m lapa_cli.main train ...` or
`torchrun --nproc-per-node N -m lapa_cli.main train ...`.
"""

from __future__ import annotations

from pathlib import Path

from lapa_cli import UserError


def _common(p, presets: tuple[str, ...]) -> None:
    p.add_argument("--data", type=Path, nargs="+", required=True, metavar="DATASET",
                   help="dataset directories (lapa data ingest); several are mixed")
    p.add_argument("--out", type=Path, required=True, help="run directory to write")
    p.add_argument("--config", type=Path, help="YAML settings file with sections model/train/data")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one setting, e.g. train.lr=3e-4 (repeatable)")
    p.add_argument("--preset", choices=presets, help="model preset (default: the config file's, else tiny)")
    p.add_argument("--steps", type=int, help="training steps (train.steps)")
    p.add_argument("--batch-size", type=int, help="global batch size (train.batch_size)")
    p.add_argument("--lr", type=float, help="peak learning rate (train.lr)")
    p.add_argument("--seed", type=int, help="seed of data order and initialisation (train.seed)")
    run = p.add_mutually_exclusive_group()
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    run.add_argument("--overwrite", action="store_true", help="delete the run in --out and start again")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _sections(args, sections=("model", "train", "data")) -> dict:
    from lapa_training.run_config import load_run_config

    config = load_run_config(args.config, args.overrides, sections)
    if args.preset:
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
    print(f"LAQ model written to {final}; curves in {args.out / 'training_curves.png'}")
    print(f"next: lapa label --laq {args.out} --data {' '.join(str(d) for d in args.data)}")
    return 0


ACTIONS = {"laq": (add_laq_parser, run_laq)}


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train models: laq (stage 1)",
                       description=__doc__.split("\n\n")[0])
    actions = p.add_subparsers(dest="action", metavar="<job>")
    for add, _ in ACTIONS.values():
        add(actions)


def run(args) -> int:
    from lapa_training.checkpoint import CheckpointError
    from lapa_training.run_config import RunConfigError
    from lapa_training.trainer import TrainingError

    if args.action is None:
        raise UserError(f"name what to train: {', '.join(ACTIONS)}")
    try:
        return ACTIONS[args.action][1](args)
    except (TrainingError, RunConfigError, CheckpointError) as e:
        raise UserError(str(e)) from None
