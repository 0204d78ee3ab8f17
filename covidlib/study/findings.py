"""What a study found, read from its folder: Table 1, the comparison with the shortcut baselines,
the contrast between splits, the external test and calibration. Each returns a table or a figure."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from covidlib import plots
from covidlib.data.dataset import load_dataset
from covidlib.data.images import read_image
from covidlib.data.scans import scan_order
from covidlib.evaluate import tables
from covidlib.evaluate.baselines import baselines_for_run
from covidlib.evaluate.stats import bootstrap_ci, check_external, compare_runs, predict_folder, test_predictions
from covidlib.models.runs import RunFolder
from covidlib.study.folder import StudyFolder
from covidlib.vocabulary import SPLIT_KINDS


def comparison(study_dir: str | Path, split_kind: str = "random", n_resamples: int = 1000):
    """Our table (CNNs and shortcut baselines on one test split) and the pairwise tests."""
    runs = StudyFolder(study_dir).models(split_kind)
    if not runs:
        return pd.DataFrame(), pd.DataFrame()
    base = baselines_for_run(next(iter(runs.values())))
    return compare_runs(runs, base, n_resamples=n_resamples)


def table1(study_dir: str | Path, split_kind: str, averaging: str = "macro", n_resamples: int = 1000) -> pd.DataFrame:
    """The paper's Table 1 beside our CNNs, every seed of each (see :mod:`covidlib.evaluate.tables`)."""
    runs = StudyFolder(study_dir).runs(split_kind, seeds=True)
    if not runs:
        return pd.DataFrame()
    table, _ = compare_runs(runs, n_resamples=n_resamples, pairs=False)
    facts = tables.run_facts({name: RunFolder(path).config() for name, path in runs.items()})
    return tables.table1(table.join(facts), averaging, split_kind)


def leakage_table(study_dir: str | Path, n_resamples: int = 1000) -> pd.DataFrame:
    """Each model's test accuracy and AUC on every split kind the study ran, and the random-to-scan drop."""
    rows = {}
    for kind in SPLIT_KINDS:
        table, _ = comparison(study_dir, kind, n_resamples=n_resamples)
        for name, r in table.iterrows():
            rows.setdefault(name, {"kind": r["kind"]})
            for m in ("accuracy", "auc"):
                rows[name][f"{kind}_{m}"] = r[m]
                rows[name][f"{kind}_{m}_low"], rows[name][f"{kind}_{m}_high"] = r[f"{m}_low"], r[f"{m}_high"]
    df = pd.DataFrame.from_dict(rows, orient="index")
    if {"random_accuracy", "scan_accuracy"} <= set(df.columns):
        df["accuracy_drop"] = df["random_accuracy"] - df["scan_accuracy"]
    return df


def split_figure(leak: pd.DataFrame):
    """Test accuracy per model on each split kind the study ran, bars side by side."""
    columns = {f"{kind} split": leak[f"{kind}_accuracy"] for kind in SPLIT_KINDS if f"{kind}_accuracy" in leak}
    return plots.grouped_bars([tables.title(n) for n in leak.index], columns,
                              title=f"Test accuracy: {' vs '.join(columns)}", range_y=(0, 1))


def external_table(study_dir: str | Path, external: str | Path, split_kind: str,
                   n_resamples: int = 1000) -> pd.DataFrame:
    """Every model of one split and the shortcut baselines, trained as they were, on another dataset.

    Evaluation only: nothing is fitted, tuned or chosen on the external images; the baselines are
    refitted exactly as on the study's split and only predict them. Internal test accuracy beside
    the external one, with the sensitivity and specificity that moved.
    """
    ext = load_dataset(external)
    runs = StudyFolder(study_dir).models(split_kind)
    first = next(iter(runs.values()))
    check_external(first, ext)
    preds = {name: predict_folder(run, ext) for name, run in runs.items()}
    internal = {name: test_predictions(run) for name, run in runs.items()}
    internal.update(baselines_for_run(first))
    preds.update(baselines_for_run(first, external=ext))
    rows = {}
    for name, df in preds.items():
        e = bootstrap_ci(df["y"], df["p_covid"], n_resamples=n_resamples)
        i = bootstrap_ci(internal[name]["y"], internal[name]["p_covid"], n_resamples=n_resamples)
        rows[name] = {"kind": "cnn" if name in runs else "baseline", "n": len(df)}
        for m in ("accuracy", "recall", "specificity", "auc"):
            rows[name][f"internal_{m}"] = i[m]["value"]
            rows[name][f"external_{m}"] = e[m]["value"]
            rows[name][f"external_{m}_low"], rows[name][f"external_{m}_high"] = e[m]["low"], e[m]["high"]
    return pd.DataFrame.from_dict(rows, orient="index")


def hardest_slices(study_dir: str | Path, split_kind: str = "random", n: int = 6, size: int = 128):
    """The test slices most CNNs get wrong, each between its scan neighbours (the same class's files
    one number before and after) with the part of the split they fell in: a slice whose neighbours
    were trained on and that most models still miss is hard in itself; one with no neighbour in
    training shows what the random split's neighbours were doing for the others. None without CNNs,
    or when no slice is missed by more than half of them."""
    study = StudyFolder(study_dir)
    runs = study.models(split_kind)
    if not runs:
        return None
    preds = [test_predictions(run).set_index("path") for run in runs.values()]
    wrong = sum(((p["p_covid"] >= 0.5).astype(int) != p["y"]).astype(int) for p in preds)
    worst = wrong[wrong > len(preds) / 2].sort_values(ascending=False, kind="stable").head(n)  # most: over half
    if worst.empty:
        return None
    dataset = load_dataset(study.data_root())
    numbers = dict(zip(dataset.manifest["path"], scan_order(dataset)))
    by_number = {(label, numbers[p]): p for p, label in zip(dataset.manifest["path"], dataset.manifest["label"])}
    part = pd.read_csv(RunFolder(next(iter(runs.values()))).split_file).set_index("path")["split"]
    images, captions = [], []
    for path, count in worst.items():
        label = dataset.manifest.set_index("path").loc[path, "label"]
        for step in (-1, 0, 1):
            shown = by_number.get((label, numbers[path] + step)) if numbers[path] is not None else None
            images.append(read_image(dataset.root / shown, size) if shown else np.zeros((size, size, 1), np.uint8))
            where = part.get(shown, "not in this run") if shown else "no such file"
            captions.append(f"{Path(path).name}: {count} of {len(runs)} wrong" if step == 0 else
                            f"{'before' if step < 0 else 'after'}: {Path(shown).name if shown else '-'} ({where})")
    return plots.image_grid(images, captions, cols=3, title=f"Test slices most CNNs get wrong ({split_kind} split), "
                            "between their scan neighbours")


def calibration_figure(study_dir: str | Path, split_kind: str = "random"):
    runs = {k: test_predictions(v) for k, v in StudyFolder(study_dir).models(split_kind).items()}
    return plots.reliability(runs, title="Reliability (test split)")
