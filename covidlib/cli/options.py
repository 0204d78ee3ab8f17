"""Argument types shared by the commands: one validator per kind of value."""

from __future__ import annotations

import argparse

from covidlib.vocabulary import SEED_RANGE


def seed(text: str) -> int:
    """A ``--seed``: a whole number in RunConfig's seed range, checked by argparse for every command."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    low, high = SEED_RANGE
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"must be between {low} and {high}, got {value}")
    return value
