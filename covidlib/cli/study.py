"""``covidlib study``: flags -> run_study()."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from covidlib.cli.options import seed
from covidlib.models.architectures import ARCHITECTURES
from covidlib.models.config import PRESETS
from covidlib.vocabulary import DEFAULT_SEED, SPLIT_KINDS


def add_study_parser(sub) -> None:
    p = sub.add_parser("study", help="train every architecture via the notebooks, then build the book")
    p.add_argument("--preset", default="smoke", help=f"{', '.join(PRESETS)}, or a YAML file (default smoke)")
    p.add_argument("--archs", nargs="+", metavar="ARCH", help="a subset of the preset's architectures: " + ", ".join(ARCHITECTURES))
    p.add_argument("--data", help="dataset folder (default: $COVIDLIB_DATA, else the embedded sample)")
    p.add_argument("--splits", nargs="+", default=list(SPLIT_KINDS), choices=SPLIT_KINDS,
                   help="split kinds to train on (default: both)")
    p.add_argument("--seed", type=seed, default=DEFAULT_SEED, help=f"seed of the splits and of every run (default {DEFAULT_SEED})")
    p.add_argument("--seeds", type=int, metavar="N",
                   help="train every model on the random split with N seeds (SEED, SEED+1, ...; default: the "
                        "preset's, cpu 3, else 1): Table 1 then shows mean +- sd and the best of N")
    p.add_argument("--jobs", type=int,
                   help="training notebooks at once (default: the preset's, smoke and cpu 2, else 1; memory!); with --executor dask and no --scheduler, "
                        "the local cluster's workers (one per GPU when there are GPUs)")
    p.add_argument("--executor", choices=("local", "dask"), default="local",
                   help="local: a pool in this process (default); dask: each training run is a task on a "
                        "Dask cluster sharing the study folder and data (pip install 'covidlib[dask]')")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="with --executor dask: an existing scheduler (tcp://host:8786); default: a local cluster")
    p.add_argument("--force", action="store_true", help="retrain finished runs")
    p.add_argument("--external", type=Path, help="an external test folder (COVID / non-COVID class folders): every "
                   "model and baseline is evaluated on it, never trained or tuned (default: $COVIDLIB_EXTERNAL)")
    p.add_argument("--sweep-cnn", action="store_true", help="also train the Basic CNN on every level of the validity "
                   "notebook's coarseness sweep (cpu preset: about 2 minutes a level on 2 cores)")
    p.add_argument("--out", type=Path, help="study folder (default studies/PRESET)")
    p.add_argument("--no-book", action="store_true", help="skip the book build")
    p.set_defaults(handler=run)


    n = sub.add_parser("notebooks", help="copy the five notebooks into a folder, to open them in JupyterLab")
    n.add_argument("dest", type=Path, help="folder to copy them into (made if missing)")
    n.add_argument("--force", action="store_true", help="overwrite notebooks already in DEST")
    n.set_defaults(handler=copy)

    pub = sub.add_parser("publish", help="copy a finished study's pages into the checkout's book/results, "
                                         "so that `jupyter-book build .` builds it")
    pub.add_argument("study", type=Path, help="the study folder (covidlib study --out)")
    pub.add_argument("--into", type=Path, help="another folder to publish into (default: the clone's book/results)")
    pub.set_defaults(handler=publish)


def run(args: argparse.Namespace) -> int:
    """Exit 1 when any run or notebook failed (the study still finishes what it can)."""
    # Each command imports its library modules when it runs: the study runner alone pulls in
    # sklearn, pandas and plotly (2.8 s measured), and `covidlib --help` or a bad flag must not wait.
    from covidlib.study.folder import StudyFolder
    from covidlib.study.runner import run_study

    study = run_study(args.preset, archs=args.archs, data=args.data, out=args.out, jobs=args.jobs,
                      force=args.force, splits=args.splits, seed=args.seed, book=not args.no_book,
                      external=args.external, executor=args.executor, scheduler=args.scheduler,
                      seeds=args.seeds, sweep_cnn=args.sweep_cnn)
    failed = StudyFolder(study).failures()
    if failed:
        print(f"covidlib: study {study} finished with failures: {', '.join(failed)} (see status.json)",
              file=sys.stderr)
        return 1
    return 0


def publish(args: argparse.Namespace) -> None:
    from covidlib.study.publish import publish as publish_study

    dest = publish_study(args.study, into=args.into)
    size = sum(f.stat().st_size for f in dest.iterdir()) / 2**20
    print(f"published {args.study} into {dest} ({size:.1f} MB); build it with: jupyter-book build .")


def copy(args: argparse.Namespace) -> None:
    from covidlib.study.notebooks import copy_notebooks

    for path in copy_notebooks(args.dest, force=args.force):
        print(path)
