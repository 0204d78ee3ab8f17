"""A study's run folders as saved, against the same runs with every model saved whole (each random
frozen backbone loaded from its recipe and written as model.keras, as covidlib did before the recipe).

    python bench/run_folder_size.py STUDY

Prints per run the bytes saved and the bytes a whole model.keras would take, then the totals and
their ratio. The baseline is measured in the same run, from the same models."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from covidlib.models.runs import RunFolder, finished_runs


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def whole_bytes(run: RunFolder) -> int:
    """The run folder's size had its model been saved whole."""
    if not run.model_recipe_file.exists():
        return folder_bytes(run.path)
    recipe = run.model_recipe_file.stat().st_size + run.model_trained_file.stat().st_size
    with tempfile.TemporaryDirectory() as tmp:
        run.load_model().save(Path(tmp) / "model.keras")
        return folder_bytes(run.path) - recipe + (Path(tmp) / "model.keras").stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path)
    args = parser.parse_args()
    folders = sorted(p for p in args.study.rglob("runs") if p.is_dir())
    totals = [0, 0]
    for folder in folders:
        for run in finished_runs(folder):
            now, whole = folder_bytes(run.path), whole_bytes(run)
            totals[0] += now
            totals[1] += whole
            print(f"{str(run.path.relative_to(args.study)):<52} {now / 1e6:9.1f} MB   whole {whole / 1e6:9.1f} MB")
    print(f"{'all runs':<52} {totals[0] / 1e6:9.1f} MB   whole {totals[1] / 1e6:9.1f} MB   "
          f"ratio {totals[0] / max(totals[1], 1):.2f}")


if __name__ == "__main__":
    main()
