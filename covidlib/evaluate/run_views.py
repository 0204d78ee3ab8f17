"""One run at a glance: its metrics with CIs, learning curves, confusion matrix, ROC / PR and a prediction grid."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from covidlib import plots
from covidlib.evaluate.stats import load_run, summarise, test_predictions
from covidlib.models.runs import RunFolder

# --- one run -------------------------------------------------------------------------------


def run_summary(run: str | Path, n_resamples: int = 1000) -> tuple[pd.DataFrame, dict]:
    """Metrics with 95% CIs as a table, and the full summary (calibration, Youden)."""
    _, preds = load_run(run)
    test = preds[preds["split"] == "test"] if "split" in preds else preds
    val = preds[preds["split"] == "val"] if "split" in preds else None
    s = summarise(test, val=val, n_resamples=n_resamples, units=RunFolder(run).units())
    table = pd.DataFrame(s["metrics"]).T[["value", "low", "high"]]
    return table, s


def run_figures(run: str | Path) -> dict:
    run = Path(run)
    title = RunFolder(run).config().arch
    test = test_predictions(run)
    _, s = run_summary(run, n_resamples=200)
    return {
        "learning_curves": plots.learning_curves(RunFolder(run).history(), f"{title}: learning curves"),
        "confusion": plots.confusion_matrix(s["confusion"], f"{title}: confusion matrix"),
        "roc_pr": plots.roc_pr({title: test}, f"{title}: ROC and precision-recall"),
    }


def prediction_grid(run: str | Path, n: int = 12, seed: int = 0, display_size: int = 128):
    """Figures 13-15: test slices captioned 'predicted (true)', green right, red wrong.

    Shows every misclassified slice first (up to ``n``), then random correct ones.
    """
    run = Path(run)
    test = test_predictions(run)
    wrong = test[(test["p_covid"] >= 0.5) != (test["y"] == 1)]
    right = test.drop(wrong.index).sample(frac=1, random_state=seed)
    pick = pd.concat([wrong.head(n // 2), right]).head(n)
    images, _ = RunFolder(run).slices(list(pick["path"]), display_size)
    return plots.prediction_grid(images, pick["y"], pick["p_covid"], title=f"{run.name}: test predictions")


