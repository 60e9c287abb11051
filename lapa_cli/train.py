"""`lapa train`: (being written)."""

from __future__ import annotations


def add_parser(sub) -> None:
    sub.add_parser("train", help="(not yet available)")


def run(args) -> int:
    from lapa_cli import UserError

    raise UserError("'lapa train' is not available yet")
