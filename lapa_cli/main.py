"""`lapa <subcommand>`: the user's entry point. Each subcommand lives in its own module here and
imports its heavy dependencies only when it runs, so `lapa --help` stays instant."""

from __future__ import annotations

import argparse
import os
import sys

from lapa_cli import UserError, convert, data, demo, evaluate, label, record, run, sim, train
from lapa_core.child_processes import end_with_parent_if_asked

SUBCOMMANDS = {"sim": sim, "record": record, "data": data, "train": train, "label": label, "convert": convert,
               "eval": evaluate, "run": run, "demo": demo}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lapa", description="Latent Action Pretraining (LAPA) on ROS 2.")
    sub = p.add_subparsers(dest="command", metavar="<command>")
    for module in SUBCOMMANDS.values():
        module.add_parser(sub)
    return p


def parse(argv: list[str]) -> argparse.Namespace:
    """The arguments of `lapa ARGV`; everything from --ros-args on belongs to ROS (args.ros_args)."""
    argv, ros_args = list(argv), []
    if "--ros-args" in argv:
        i = argv.index("--ros-args")
        argv, ros_args = argv[:i], argv[i:]
    args = parser().parse_args(argv)
    args.ros_args = ros_args
    return args


def dispatch(args: argparse.Namespace) -> int:
    """Run a parsed command in this process; a UserError propagates (the demo runs its stages so)."""
    return int(SUBCOMMANDS[args.command].run(args) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    end_with_parent_if_asked()  # a command the demo runs beside its recording
    if not sys.stderr.isatty():
        # progress bars into a log file: one update every 10 s instead of ten a second (tqdm reads
        # TQDM_* at import, which the subcommands do lazily; worker processes inherit it)
        os.environ.setdefault("TQDM_MININTERVAL", "10")
    args = parse(argv)
    if args.command is None:
        parser().print_help()
        return 1
    try:
        return dispatch(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except UserError as e:
        print(f"lapa {args.command}: error: {' '.join(str(e).split())}", file=sys.stderr)  # one line, always
        return 2


if __name__ == "__main__":
    sys.exit(main())
