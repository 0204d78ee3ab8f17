"""How coarse must a grouping be? Test accuracy against the number of groups a split keeps whole.

The data has no patient IDs. A grouped split keeps look-alike slices on one side; the finer the
grouping, the more slices of one patient can still fall on both sides. The sweep makes a grouped
split at several levels, from near-duplicate components (about 1,600 groups on the full data) to
about 60 clusters (fewer than the ~120 patients), and scores the shortcut baselines (and, when
asked, the Basic CNN) on each. A curve that keeps falling as groups get coarser says the finer
splits still leaked; a flat one says they did not, for these models.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

from covidlib import CovidlibError
from covidlib.data.dataset import Dataset
from covidlib.data.splits import Split, make_split
from covidlib.evaluate.baselines import run_baselines
from covidlib.evaluate.stats import bootstrap_ci, test_predictions
from covidlib.evaluate.tables import title
from covidlib.models.runs import RunFolder
from covidlib.models.train import train
from covidlib.vocabulary import DEFAULT_SEED

LEVELS = (None, 800, 400, 200, 120, 60)  # None: near-duplicate components at the default threshold


def sweep_splits(dataset: Dataset, levels=LEVELS, seed: int = DEFAULT_SEED) -> dict[int, Split]:
    """Number of groups -> a grouped split at that level (levels larger than the data are skipped)."""
    out = {}
    for level in levels:
        if level is not None and level > len(dataset.manifest) // 2:
            continue
        split = make_split(dataset, "grouped", seed=seed, n_groups=level)
        out[split.info["grouping"]["groups"]] = split
    return out


def coarseness_sweep(dataset: Dataset, levels=LEVELS, seed: int = DEFAULT_SEED, n_resamples: int = 1000,
                     cnn: dict[int, pd.DataFrame] | None = None,
                     splits: dict[int, Split] | None = None) -> pd.DataFrame:
    """One row per (level, model): groups, the test slices' near-duplicates in train, accuracy and CI.
    ``cnn`` adds a CNN's test predictions per level (the same splits, e.g. from :func:`cnn_on_levels`);
    ``splits`` reuses splits already made by :func:`sweep_splits`.
    """
    rows = []
    for groups, split in (splits or sweep_splits(dataset, levels, seed)).items():
        preds = run_baselines(dataset, split, seed=seed)
        if cnn and groups in cnn:
            preds["basic_cnn"] = cnn[groups]
        for name, df in preds.items():
            ci = bootstrap_ci(df["y"], df["p_covid"], n_resamples=n_resamples, seed=seed)["accuracy"]
            rows.append({"groups": groups, "model": name, "accuracy": ci["value"], "low": ci["low"],
                         "high": ci["high"], "test_near_duplicates": split.info["near_duplicates"]["fraction"]})
    return pd.DataFrame(rows)


def sweep_figure(sweep: pd.DataFrame):
    """Accuracy (with CIs) against the number of groups, log scale, one line per model."""
    fig = go.Figure()
    for name, rows in sweep.groupby("model", sort=False):
        rows = rows.sort_values("groups")
        fig.add_scatter(x=rows["groups"], y=rows["accuracy"], name=title(name), mode="lines+markers",
                        error_y=dict(type="data", symmetric=False, array=rows["high"] - rows["accuracy"],
                                     arrayminus=rows["accuracy"] - rows["low"]))
    fig.update_layout(title="Test accuracy against the number of groups kept whole (coarser to the left)",
                      xaxis_title="groups in the grouped split (log scale)", yaxis_title="test accuracy",
                      xaxis_type="log", height=440)
    return fig


def cnn_on_levels(template: str | Path, splits: dict[int, Split], out: str | Path) -> dict[int, pd.DataFrame]:
    """Train the model of the finished run ``template`` with its own settings on every level's split and
    return its test predictions per level, for :func:`coarseness_sweep`'s ``cnn``.

    Split files and run folders go to ``out``; a finished run is reused, so a rerun of the validity
    notebook trains nothing. Early stopping watches each level's validation slices.
    """
    template = RunFolder(template)
    if not template.finished:
        raise CovidlibError(f"{template.path} is not a finished run: the sweep trains with the settings of the "
                            "study's scan-split run, so the study needs one")
    config = template.config()
    files = save_sweep_splits(splits, out)
    preds = {}
    for groups, path in files.items():
        run = train(dataclasses.replace(config, split=str(path), out=None), resume=True,
                    run_dir=Path(out) / "runs" / f"{config.arch}-{groups}-groups")
        preds[groups] = test_predictions(run)
    return preds


def save_sweep_splits(splits: dict[int, Split], folder: str | Path) -> dict[int, Path]:
    """The sweep's split files, so a CNN can be trained on each (``covidlib train --split``)."""
    folder = Path(folder)
    return {groups: split.save(folder / f"split-grouped-{groups}.csv") for groups, split in splits.items()}
