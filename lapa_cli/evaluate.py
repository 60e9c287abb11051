"""`lapa eval`: (being written)."""

from __future__ import annotations


def add_parser(sub) -> None:
    sub.add_parser("eval", help="(not yet available)")


def run(args) -> int:
    from lapa_cli import UserError

    raise UserError("'lapa eval' is not available yet")
