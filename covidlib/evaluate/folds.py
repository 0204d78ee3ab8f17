"""K-fold cross-validation over scans: every slice is tested once, by a model that saw none of its scan.

One scan split gives one test set; which scans land in it moves accuracy by several points. K folds
of whole scan segments (``make_kfold(..., "scan")``) show that spread. The CNN is retrained on each
fold with the settings of a finished run of the study (its template), so only the split changes;
the shortcut baselines are refitted on the same folds. Split files and run folders go to one folder,
and a finished fold run is reused, so rerunning a report notebook trains nothing. A fold that puts
every slice where the template's own split does (fold 1 of 5 is the study's scan split: both are the
first fold of one seeded ``StratifiedGroupKFold``) is the template's run, not trained again.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd

from covidlib import CovidlibError
from covidlib.data.dataset import Dataset
from covidlib.data.splits import Split, load_split, make_kfold
from covidlib.evaluate.baselines import run_baselines
from covidlib.evaluate.stats import test_predictions
from covidlib.metrics import binary_metrics
from covidlib.models.config import RunConfig
from covidlib.models.runs import RunFolder
from covidlib.models.train import split_used, train


def fold_run_name(arch: str, fold: int, k: int) -> str:
    """``basic_cnn-scan-fold1-of-5``: the run folder of one fold (folds counted from 1)."""
    return f"{arch}-scan-fold{fold + 1}-of-{k}"


def save_scan_folds(dataset: Dataset, k: int, out: str | Path, seed: int) -> list[tuple[Split, Path]]:
    """The K scan folds, each written as a split file in ``out`` (``split-scan-fold1-of-5.csv``)."""
    folds = make_kfold(dataset, "scan", k=k, seed=seed)
    return [(split, split.save(Path(out) / f"split-scan-fold{i + 1}-of-{k}.csv")) for i, split in enumerate(folds)]


def serves_fold(config: RunConfig, trained_on: pd.DataFrame, fold: Split) -> bool:
    """Whether a run of ``config`` on ``fold`` would put every slice it uses in the same part (train,
    val or test) as the run of ``config`` that used ``trained_on``: then that run is the fold's run."""
    parts = [table[["path", "split"]].sort_values("path", ignore_index=True)
             for table in (split_used(fold, config), trained_on)]
    return parts[0].equals(parts[1])


def scan_cross_validation(template: str | Path, dataset: Dataset, k: int, out: str | Path) -> pd.DataFrame:
    """One row per (model, fold): test slices, test scans, accuracy and AUC, for the CNN of the finished
    run ``template`` retrained on every fold and for each shortcut baseline fitted on the same folds."""
    template = RunFolder(template)
    if not template.finished:
        raise CovidlibError(f"{template.path} is not a finished run: scan cross-validation retrains it on "
                            "every fold with its own settings")
    config = template.config()
    trained_on = load_split(template.split_file).table
    rows = []
    for fold, (split, path) in enumerate(save_scan_folds(dataset, k, out, config.seed)):
        run = template.path if serves_fold(config, trained_on, split) else train(
            dataclasses.replace(config, split=str(path), out=None), resume=True,
            run_dir=Path(out) / "runs" / fold_run_name(config.arch, fold, k))
        preds = {config.arch: test_predictions(run), **run_baselines(dataset, split)}
        scans = split.table.loc[split.table["split"] == "test", "group"].nunique()
        for name, df in preds.items():
            m = binary_metrics(df["y"], df["p_covid"])
            rows.append({"model": name, "kind": "cnn" if name == config.arch else "baseline", "fold": fold + 1,
                         "test_slices": len(df), "test_scans": int(scans), "accuracy": m["accuracy"], "auc": m["auc"]})
    return pd.DataFrame(rows)


def fold_summary(folds: pd.DataFrame) -> pd.DataFrame:
    """Per model: mean, standard deviation, lowest and highest accuracy and AUC over the folds."""
    summary = folds.groupby("model", sort=False).agg(
        kind=("kind", "first"), folds=("fold", "count"), slices=("test_slices", "sum"),
        accuracy_mean=("accuracy", "mean"), accuracy_sd=("accuracy", "std"), accuracy_min=("accuracy", "min"),
        accuracy_max=("accuracy", "max"), auc_mean=("auc", "mean"), auc_sd=("auc", "std"))
    return summary
