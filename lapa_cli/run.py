"""`lapa run <graph>`: (being written)."""

from __future__ import annotations


def add_parser(sub) -> None:
    sub.add_parser("run", help="(not yet available)")


def run(args) -> int:
    from lapa_cli import UserError

    raise UserError("'lapa run' is not available yet")
