"""`lapa label`: (being written)."""

from __future__ import annotations


def add_parser(sub) -> None:
    sub.add_parser("label", help="(not yet available)")


def run(args) -> int:
    from lapa_cli import UserError

    raise UserError("'lapa label' is not available yet")
