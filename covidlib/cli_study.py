"""``covidlib study``: flags -> run_study()."""

from __future__ import annotations

import argparse
from pathlib import Path

from covidlib.config import PRESETS


def add_study_parser(sub) -> None:
    p = sub.add_parser("study", help="train every architecture via the notebooks, then build the book")
    p.add_argument("--preset", default="smoke", help=f"{', '.join(PRESETS)}, or a YAML file (default smoke)")
    p.add_argument("--archs", nargs="+", help="a subset of the preset's architectures")
    p.add_argument("--data", help="dataset folder (default: $COVIDLIB_DATA, else the embedded sample)")
    p.add_argument("--splits", nargs="+", default=["random", "grouped"], help="random and/or grouped")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--jobs", type=int, default=1, help="architectures trained at once (memory!)")
    p.add_argument("--force", action="store_true", help="retrain finished runs")
    p.add_argument("--out", type=Path, help="study folder (default studies/PRESET)")
    p.add_argument("--no-book", action="store_true", help="skip the book build")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> None:
    from covidlib.study import run_study

    run_study(args.preset, archs=args.archs, data=args.data, out=args.out, jobs=args.jobs, force=args.force,
              splits=args.splits, seed=args.seed, book=not args.no_book)
