"""The lung-masked experiment: is the signal in the lungs?

The Basic CNN and the shortcut baselines are trained and tested again on each split with the lung
fields blacked out (``no_lungs``) and with everything but the lung fields blacked out
(``lungs_only``), beside their scores on whole slices. A model that stays far above chance with no
lungs to look at reads something outside them: the body outline, the table, the scanner's field of
view, burnt-in text. The mask is the project's classical one (:mod:`covidlib.data.lungs`), rough
on purpose, so a little lung tissue can survive the blacking out and a little body wall the crop.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd

from covidlib import CovidlibError
from covidlib.data.dataset import Dataset
from covidlib.data.lungs import LUNG_VIEWS
from covidlib.data.splits import load_split
from covidlib.evaluate.baselines import run_baselines
from covidlib.evaluate.stats import bootstrap_ci, test_predictions
from covidlib.models.runs import RunFolder
from covidlib.models.train import train

MASKED_VIEWS = tuple(v for v in LUNG_VIEWS if v != "whole")  # the views a model is retrained on


def masked_run_dir(out: str | Path, arch: str, kind: str, view: str) -> Path:
    """``OUT/runs/basic_cnn-scan-no_lungs``: one retrained run of the experiment."""
    return Path(out) / "runs" / f"{arch}-{kind}-{view}"


def lung_masked_experiment(templates: dict[str, str | Path], dataset: Dataset, out: str | Path,
                           n_resamples: int = 1000) -> pd.DataFrame:
    """One row per (split kind, view, model): test accuracy and AUC with 95% CIs (whole scans
    resampled on a scan split). ``templates`` maps a split kind to a finished CNN run on it; the CNN
    is retrained with that run's settings and split on every masked view, the baselines refitted."""
    rows = []
    for kind, template in templates.items():
        template = RunFolder(template)
        if not template.finished:
            raise CovidlibError(f"{template.path} is not a finished run: the lung-masked experiment retrains it "
                                "on every view with its own settings")
        config, split = template.config(), load_split(template.split_file, dataset)
        units = template.units()
        for view in LUNG_VIEWS:
            if view == "whole":
                cnn = template.path
            else:
                # the split file the template was trained from (its own split.csv may be a subsample of it)
                cnn = train(dataclasses.replace(config, split=config.split or str(template.split_file), lungs=view,
                                                out=None), resume=True, run_dir=masked_run_dir(out, config.arch, kind, view))
            preds = {config.arch: test_predictions(cnn), **run_baselines(dataset, split, lungs=view)}
            for name, df in preds.items():
                groups = None if units is None else units.loc[df["path"]].to_numpy()
                ci = bootstrap_ci(df["y"], df["p_covid"], n_resamples=n_resamples, groups=groups)
                rows.append({"split": kind, "view": view, "model": name,
                             "kind": "cnn" if name == config.arch else "baseline", "n": len(df),
                             **{f"{m}{s}": ci[m][k] for m in ("accuracy", "auc")
                                for s, k in (("", "value"), ("_low", "low"), ("_high", "high"))}})
    return pd.DataFrame(rows)
