"""Wall time of a whole study at one preset, one training notebook at a time against two at a time.

    python bench/study.py [--preset smoke] [--data DIR] [--jobs 1 2]

Each variant runs ``covidlib study`` from scratch into its own temporary folder with its own empty
cache (decoded images, hashes and features are recomputed every time), one after the other on the
same machine, and prints the wall time of each, its ratio to the first, and the cells that took longest
summed over the executed notebooks. On a 2-core CPU the
smoke study is dominated by per-notebook costs that use one core (kernel start, imports, tracing),
which a second notebook at a time overlaps.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(preset: str, jobs: int, data: str | None) -> tuple[float, str]:
    """Wall seconds, and where they went by the study's own ``status.json``."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "COVIDLIB_CACHE": str(Path(tmp) / "cache")}
        cmd = [sys.executable, "-m", "covidlib.cli", "study", "--preset", preset, "--jobs", str(jobs),
               "--out", str(Path(tmp) / "study")] + (["--data", data] if data else [])
        t0 = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - t0
        status = json.loads((Path(tmp) / "study" / "status.json").read_text())
        train = sum(v.get("seconds", 0) for k, v in status.items() if not k.startswith("notebook:"))
        reports = sum(v.get("seconds", 0) for k, v in status.items() if k.startswith("notebook:"))
        return seconds, (f"training notebooks {train:.0f} s summed over runs, report notebooks {reports:.0f} s"
                         + "".join(f"\n    {s:6.1f} s  {cell}" for cell, s in slowest_cells(Path(tmp) / "study")))


def slowest_cells(study: Path, n: int = 6) -> list[tuple[str, float]]:
    """The code cells that took longest, summed over the executed notebooks of one kind (papermill
    records each cell's duration): where a study's time goes, without a profiler."""
    totals: dict[str, float] = {}
    for path in (study / "notebooks").glob("*.ipynb"):
        kind = path.stem.split("_")[0]  # train_ARCH-SPLIT -> train
        for cell in json.loads(path.read_text())["cells"]:
            lines = "".join(cell["source"]).strip().splitlines()
            seconds = cell.get("metadata", {}).get("papermill", {}).get("duration") or 0
            if cell["cell_type"] == "code" and lines:
                key = f"{kind}: {lines[-1][:60]}"
                totals[key] = totals.get(key, 0.0) + seconds
    return sorted(totals.items(), key=lambda kv: -kv[1])[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="smoke")
    ap.add_argument("--data")
    ap.add_argument("--jobs", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    print(f"preset {args.preset}, {os.cpu_count()} CPUs, data {args.data or 'embedded sample'}")
    base = None
    for jobs in args.jobs:
        seconds, parts = run(args.preset, jobs, args.data)
        base = base or seconds
        print(f"--jobs {jobs}: {seconds:.0f} s wall ({parts}), ratio to --jobs {args.jobs[0]}: {seconds / base:.2f}",
              flush=True)


if __name__ == "__main__":
    main()
