"""The ``covidlib`` command: a thin layer of flags over the library.

Every user mistake ends as one line on stderr and exit code 2; nothing half-written
is left behind because every file is written through a temporary name.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from covidlib import CovidlibError, __version__
from covidlib.cli.options import seed
from covidlib.paths import printable
from covidlib.vocabulary import DEFAULT_SEED, SPLIT_CHOICES


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad option is one line (no usage dump) and exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"covidlib: error: {printable(message)}\n")


def _data_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="dataset folder with COVID / non-COVID class folders "
                   "(default: $COVIDLIB_DATA, else the embedded sample)")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable files and list them instead of failing")


def build_parser() -> argparse.ArgumentParser:
    from covidlib.data.splits import DEFAULT_THRESHOLD

    parser = _Parser(prog="covidlib", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"covidlib {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    data = sub.add_parser("data", help="inspect, split or download a dataset")
    dsub = data.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    info = dsub.add_parser("info", help="counts per class, size range, manifest hash")
    _data_arg(info)
    info.add_argument("--json", action="store_true", help="print the summary as JSON")
    info.add_argument("--manifest", type=Path, help="also write the manifest CSV here")

    split = dsub.add_parser("split", help="write train/val/test split CSVs")
    _data_arg(split)
    split.add_argument("--kind", choices=SPLIT_CHOICES, default="random",
                       help="random: the paper's stratified shuffle; grouped: near-duplicates stay together; "
                            "scan: runs of consecutively numbered look-alike slices (scans) stay together")
    split.add_argument("--out", type=Path, default=Path("splits"), help="folder for the CSV files")
    split.add_argument("--seed", type=seed, default=DEFAULT_SEED, help=f"seed of the shuffle (default {DEFAULT_SEED})")
    split.add_argument("--test-fraction", type=float, default=0.2, help="share of images in the test split (default 0.2)")
    split.add_argument("--val-fraction", type=float, default=0.1, help="share of train held out for early stopping")
    split.add_argument("--threshold", type=int, default=DEFAULT_THRESHOLD,
                       help=f"near-duplicate Hamming distance in bits of a 256-bit phash (default {DEFAULT_THRESHOLD})")
    split.add_argument("--kfold", type=int, metavar="K", help="write K stratified folds instead of one split")
    split.add_argument("--groups", type=int, metavar="N",
                       help="with --kind grouped: about N clusters of look-alike slices kept whole (a patient-like "
                            "grouping; the dataset's ~120 patients suggest 120) instead of near-duplicate components")

    fetch = dsub.add_parser("fetch", help="download the paper's dataset (Kaggle) or the external test set (UCSD)")
    fetch.add_argument("--dataset", choices=("sarscov2-ct", "ucsd-covid-ct"), default="sarscov2-ct",
                       help="sarscov2-ct: the paper's, from Kaggle with kagglehub (default); ucsd-covid-ct: "
                            "UCSD-AI4H's COVID-CT from GitHub, for evaluation only (--external)")
    fetch.add_argument("--out", type=Path, help="put it here (default: kagglehub's cache, or covidlib's cache for UCSD)")

    from covidlib.cli.train import add_train_parser

    add_train_parser(sub)
    from covidlib.cli.evaluate import add_parsers

    add_parsers(sub)
    from covidlib.cli.study import add_study_parser

    add_study_parser(sub)
    return parser


def _cmd_data(args: argparse.Namespace) -> None:
    from covidlib.data.dataset import load_dataset
    from covidlib.data.fetch import fetch, fetch_ucsd
    from covidlib.paths import data_dir

    if args.data_command == "fetch":
        if args.dataset == "ucsd-covid-ct":
            path = fetch_ucsd(args.out)
            print(f"external test set ready at {path}; use covidlib study --external {path} "
                  f"(evaluation only: never train or tune on it)")
            return
        path = fetch(args.out)
        print(f"dataset ready at {path}; use --data {path} or export COVIDLIB_DATA={path}")
        return
    dataset = load_dataset(data_dir(args.data), skip_bad=args.skip_bad, progress=sys.stderr.isatty())
    if args.data_command == "info":
        summary = dataset.summary()
        if args.manifest:
            from covidlib.paths import atomic_path

            with atomic_path(args.manifest, suffix=".csv") as tmp:
                dataset.manifest.to_csv(tmp, index=False)
        if args.json:
            print(json.dumps(summary, indent=2))
            return
        print(f"dataset      {summary['root']}")
        for name, n in summary["counts"].items():
            print(f"{name:<12} {n} images")
        print(f"total        {summary['images']} images")
        print(f"width        {summary['width'][0]}-{summary['width'][1]} px")
        print(f"height       {summary['height'][0]}-{summary['height'][1]} px ({summary['distinct_sizes']} distinct sizes)")
        print(f"manifest     {summary['manifest_hash']}")
        for bad in summary["skipped"]:
            print(f"skipped      {printable(bad['path'])}: {printable(bad['reason'])}")
        return
    if args.data_command == "split":
        from covidlib.data.splits import make_kfold, make_split

        progress = sys.stderr.isatty()
        if args.kfold is not None and args.groups:
            raise CovidlibError("--groups makes one split of Ward clusters; --kfold does not use it (leave one out)")
        if args.kfold is not None:
            made = make_kfold(dataset, args.kind, k=args.kfold, seed=args.seed, val_fraction=args.val_fraction,
                                threshold=args.threshold, progress=progress)
            names = [f"{args.kind}-k{args.kfold}-fold{i}-seed{args.seed}.csv" for i in range(len(made))]
        else:
            made = [make_split(dataset, args.kind, seed=args.seed, test_fraction=args.test_fraction,
                                 val_fraction=args.val_fraction, threshold=args.threshold, progress=progress,
                                 n_groups=args.groups)]
            names = [f"{args.kind}-seed{args.seed}.csv"]
        for split, name in zip(made, names):
            path = split.save(args.out / name)
            c, nd = split.info["counts"], split.info["near_duplicates"]
            sizes = " ".join(f"{s}={sum(c[s].values())}" for s in ("train", "val", "test"))
            print(f"{path}: {sizes}; {nd['with_train_near_duplicate']}/{nd['test_images']} test images "
                  f"({100 * nd['fraction']:.1f}%) have a near-duplicate in train (phash distance <= {nd['threshold']})"
                  + _neighbour_text(split.info.get("scan_neighbours")))


def _neighbour_text(found: dict | None) -> str:
    """The scan-neighbour leak in words (absent where the file names carry no numbers)."""
    if not found:
        return ""
    return (f", {100 * found['fraction_within_1']:.1f}% a same-class scan neighbour (+-1 file number; "
            f"+-3: {100 * found['fraction_within_3']:.1f}%)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "data":
            _cmd_data(args)
        else:
            return args.handler(args) or 0
    except CovidlibError as exc:
        print(f"covidlib: error: {printable(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:  # a path of the wrong kind (file vs folder), no permission, a full disk
        where = f"{printable(str(exc.filename))}: " if exc.filename else ""
        print(f"covidlib: error: {where}{printable(exc.strerror or str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("covidlib: interrupted; finished files are intact, partial ones were not written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
