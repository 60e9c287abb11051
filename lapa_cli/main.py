"""`lapa <subcommand>`: the user's entry point. Each subcommand lives in its own module here and
imports its heavy dependencies only when it runs, so `lapa --help` stays instant."""

from __future__ import annotations

import argparse
import os
import sys

from lapa_cli import UserError, data, demo, evaluate, label, record, run, sim, train
from lapa_cli.background import end_with_parent_if_asked

SUBCOMMANDS = {"sim": sim, "record": record, "data": data, "train": train, "label": label, "eval": evaluate,
               "run": run, "demo": demo}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    end_with_parent_if_asked()  # a command the demo runs beside its recording
    if not sys.stderr.isatty():
        # progress bars into a log file: one update every 10 s instead of ten a second (tqdm reads
        # TQDM_* at import, which the subcommands do lazily; worker processes inherit it)
        os.environ.setdefault("TQDM_MININTERVAL", "10")
    # Everything after --ros-args belongs to ROS, not to us.
    ros_args: list[str] = []
    if "--ros-args" in argv:
        i = argv.index("--ros-args")
        argv, ros_args = argv[:i], argv[i:]
    parser = argparse.ArgumentParser(prog="lapa", description="Latent Action Pretraining (LAPA) on ROS 2.")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, module in SUBCOMMANDS.items():
        module.add_parser(sub)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 1
    args.ros_args = ros_args
    try:
        return int(SUBCOMMANDS[args.command].run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except UserError as e:
        print(f"lapa {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
