"""What a study found, read from its folder: Table 1, the comparison with the shortcut baselines,
the contrast between splits, the external test and calibration. Each returns a table or a figure."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from covidlib import plots
from covidlib.data.dataset import load_dataset
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
    return tables.table1(table.join(facts), averaging)


def leakage_table(study_dir: str | Path, n_resamples: int = 1000) -> pd.DataFrame:
    """Each model's test accuracy and AUC on every split kind the study ran, and the random-to-grouped drop."""
    rows = {}
    for kind in SPLIT_KINDS:
        table, _ = comparison(study_dir, kind, n_resamples=n_resamples)
        for name, r in table.iterrows():
            rows.setdefault(name, {"kind": r["kind"]})
            for m in ("accuracy", "auc"):
                rows[name][f"{kind}_{m}"] = r[m]
                rows[name][f"{kind}_{m}_low"], rows[name][f"{kind}_{m}_high"] = r[f"{m}_low"], r[f"{m}_high"]
    df = pd.DataFrame.from_dict(rows, orient="index")
    if {"random_accuracy", "grouped_accuracy"} <= set(df.columns):
        df["accuracy_drop"] = df["random_accuracy"] - df["grouped_accuracy"]
    return df


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


def calibration_figure(study_dir: str | Path, split_kind: str = "random"):
    runs = {k: test_predictions(v) for k, v in StudyFolder(study_dir).models(split_kind).items()}
    return plots.reliability(runs, title="Reliability (test split)")
