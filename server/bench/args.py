"""Argument types shared by the bench commands."""

from __future__ import annotations

import argparse


def parse_ints(text: str) -> list[int]:
    """A comma-separated list of positive integers (e.g. "1,8,32")."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values
