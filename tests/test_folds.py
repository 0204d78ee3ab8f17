"""Cross-validation over scans and the lung-masked experiment: their summaries, tables and sentences
on tables with known answers, and the fold that reuses its template's run (the trained runs are
checked on the smoke study in test_study.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from covidlib.evaluate import sentences, tables
from covidlib.evaluate.folds import fold_run_name, fold_summary


def _folds() -> pd.DataFrame:
    return pd.DataFrame({"model": ["basic_cnn"] * 3 + ["nearest_neighbour"] * 3, "kind": ["cnn"] * 3 + ["baseline"] * 3,
                         "fold": [1, 2, 3] * 2, "test_slices": [10, 11, 12] * 2, "test_scans": [3, 4, 3] * 2,
                         "accuracy": [0.9, 0.8, 0.7, 0.6, 0.5, 0.55], "auc": [0.95, 0.85, 0.9, 0.6, 0.5, 0.7]})


def test_the_fold_summary_is_the_mean_and_sample_sd_over_folds():
    s = fold_summary(_folds())
    assert list(s.index) == ["basic_cnn", "nearest_neighbour"]
    assert s.loc["basic_cnn", "accuracy_mean"] == pytest.approx(0.8)
    assert s.loc["basic_cnn", "accuracy_sd"] == pytest.approx(np.std([0.9, 0.8, 0.7], ddof=1))
    assert s.loc["nearest_neighbour", ["accuracy_min", "accuracy_max"]].tolist() == [0.5, 0.6]
    assert s.loc["basic_cnn", "slices"] == 33 and s.loc["basic_cnn", "folds"] == 3
    shown = tables.fold_display(s)
    assert shown["Accuracy % (mean ± sd)"].tolist() == ["80.0 ± 10.0", "55.0 ± 5.0"]
    assert sentences.fold_sentence(s) == (
        "Over 3 folds of whole scans (every slice tested once, by a model that saw no slice of its scan segment), "
        "test accuracy, mean ± standard deviation over folds (lowest to highest fold), was: Basic CNN 80.0% ± 10.0 "
        "(70.0 to 90.0); 1-NN on 32x32 pixels 55.0% ± 5.0 (50.0 to 60.0).")


def test_fold_runs_are_named_from_one():
    assert fold_run_name("basic_cnn", 0, 5) == "basic_cnn-scan-fold1-of-5"


def test_the_masked_table_has_one_column_per_view_and_the_sentence_names_each():
    rows = []
    for kind in ("random", "scan"):
        for view, acc in (("whole", 0.95), ("no_lungs", 0.85), ("lungs_only", 0.75)):
            for model, shift in (("basic_cnn", 0.0), ("size_only", -0.2), ("histogram_lungs", -0.1)):
                a = acc + shift - (0.05 if kind == "scan" else 0)
                rows.append({"split": kind, "view": view, "model": model, "kind": "cnn" if model == "basic_cnn" else "baseline",
                             "n": 40, "accuracy": a, "accuracy_low": a - 0.05, "accuracy_high": a + 0.05})
    table = pd.DataFrame(rows)
    shown = tables.masked_display(table)
    assert len(shown) == 6 and list(shown.columns[2:]) == [
        "Whole slice: accuracy % (95% CI)", "Lungs blacked out: accuracy % (95% CI)", "Lungs only: accuracy % (95% CI)"]
    cnn_scan = shown[(shown["Split"] == "scan split") & (shown["Model"] == "Basic CNN")].iloc[0]
    assert cnn_scan["Lungs blacked out: accuracy % (95% CI)"] == "80.0 (75.0-85.0)"
    assert sentences.masked_sentence(table) == (
        "Test accuracy (95% CI) on the random and the scan splits, in that order: the Basic CNN reached 95.0% (90.0 to "
        "100.0), 90.0% (85.0 to 95.0) on whole slices, 85.0% (80.0 to 90.0), 80.0% (75.0 to 85.0) with the lung fields "
        "blacked out and 75.0% (70.0 to 80.0), 70.0% (65.0 to 75.0) with only the lungs left; with the lungs blacked out "
        "the best shortcut baseline reached 75.0% (Grey histograms in / out of the lungs (random forest)), 70.0% (Grey "
        "histograms in / out of the lungs (random forest)). Chance is about 50%.")


@pytest.mark.slow
@pytest.mark.parametrize("made_by, k", [("a split file", 2), ("its own run", 5)])
def test_a_scan_fold_that_is_the_templates_own_split_reuses_its_run(sample_data, tmp_path, monkeypatch, made_by, k):
    """Fold 1 of K scan folds is the scan split of test fraction 1/K (one seeded StratifiedGroupKFold
    draws both): scan cross-validation reads the template's finished run there and trains the rest,
    whether the template was handed a split file or made its own (``--split-kind scan``, 1/5 test)."""
    from covidlib.data.dataset import load_dataset
    from covidlib.data.splits import make_kfold, make_split
    from covidlib.evaluate import folds
    from covidlib.evaluate.stats import test_predictions
    from covidlib.metrics import binary_metrics
    from covidlib.models.config import resolve
    from covidlib.models.train import split_used, train

    dataset = load_dataset(sample_data)
    own = make_split(dataset, "scan", seed=42, test_fraction=1 / k)
    config = resolve("basic_cnn", "smoke", data=str(sample_data), seed=42, split_kind="scan",
                     split=str(own.save(tmp_path / "split-scan.csv")) if made_by == "a split file" else None)
    kfold = make_kfold(dataset, "scan", k=k, seed=42)
    used = split_used(own, config)  # the smoke preset's subsample
    assert [folds.serves_fold(config, used, fold) for fold in kfold] == [True] + [False] * (k - 1)
    template = train(config, run_dir=tmp_path / "template")
    trained = []
    monkeypatch.setattr(folds, "train", lambda config, **kw: trained.append(kw["run_dir"]) or train(config, **kw))
    rows = folds.scan_cross_validation(template, dataset, k, tmp_path / "cv").set_index(["model", "fold"])
    assert [p.name for p in trained] == [folds.fold_run_name("basic_cnn", i, k) for i in range(1, k)]
    assert not (tmp_path / "cv" / "runs" / folds.fold_run_name("basic_cnn", 0, k)).exists()
    preds = test_predictions(template)
    assert rows.loc[("basic_cnn", 1), "accuracy"] == binary_metrics(preds["y"], preds["p_covid"])["accuracy"]
    assert rows.loc[("basic_cnn", 1), "test_slices"] == len(preds)


@pytest.mark.parametrize("preset, k, planned", [("cpu", 5, (2, 3, 4, 5)), ("smoke", 5, (2, 3, 4, 5)),
                                                ("cpu", 2, (1, 2))])
def test_a_study_plans_no_retraining_for_the_scan_fold_that_is_its_scan_split(sample_data, tmp_path, preset, k,
                                                                              planned):
    """5 scan folds and the study's scan split (test fraction 1/5, same seed; the smoke preset's
    subsample of each is the same): the pool trains folds 2 to 5 and the lung-masked views, and
    leaves fold 1 to the basic_cnn-scan run. 2 folds hold half the slices out: both are trained."""
    from covidlib.data.dataset import load_dataset
    from covidlib.study.folder import StudyFolder
    from covidlib.study.runner import StudyPlan, _retraining_runs, prepare_splits

    dataset = load_dataset(sample_data)
    study = StudyFolder(tmp_path)
    split_files = prepare_splits(study, dataset, ("random", "scan"), 42)
    what = StudyPlan(preset, ["basic_cnn"], ("random", "scan"), 42, 1, 1, "local", None, scan_folds=k)
    keys = [run.key for run in _retraining_runs(what, study, dataset, split_files)]
    assert keys == [f"scan-cv:basic_cnn-scan-fold{i}-of-{k}" for i in planned] + [
        f"lung-masked:basic_cnn-{kind}-{view}" for kind in ("random", "scan") for view in ("no_lungs", "lungs_only")]
