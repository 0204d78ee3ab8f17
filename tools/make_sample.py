"""Rebuild the embedded sample (covidlib/sample_data) from the full dataset.

    python tools/make_sample.py ../shared/data/sarscov2-ct --per-class 100 --seed 0

A stratified random sample at original resolution, copied byte for byte, with the
dataset's licence and attribution beside it.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np

from covidlib.data.dataset import load_dataset
from covidlib.paths import SAMPLE_DATA


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("source", type=Path)
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    ds = load_dataset(args.source)
    rng = np.random.default_rng(args.seed)
    for label in ("COVID", "non-COVID"):
        rows = ds.manifest[ds.manifest["label"] == label]
        pick = rows.iloc[np.sort(rng.choice(len(rows), args.per_class, replace=False))]
        out = SAMPLE_DATA / label
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        for rel in pick["path"]:
            shutil.copy2(ds.root / rel, out / Path(rel).name)
    print(f"wrote {2 * args.per_class} images to {SAMPLE_DATA}")


if __name__ == "__main__":
    main()
