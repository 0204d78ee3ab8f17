from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from covidlib.data.dataset import load_dataset
from covidlib.data.splits import make_split
from covidlib.evaluate.baselines import run_baselines
from covidlib.evaluate.stats import (
    _resampled_metrics,
    _stratified_indices,
    aggregate_seeds,
    bootstrap_ci,
    compare_predictions,
    expected_calibration_error,
    mcnemar_exact,
    paired_auc_bootstrap,
)
from covidlib.metrics import binary_metrics
from tests.conftest import write_png


def test_metrics_match_sklearn_on_a_hand_made_case():
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 1])
    p = np.array([0.9, 0.8, 0.3, 0.6, 0.2, 0.7, 0.1, 0.4, 0.55, 0.45])
    m = binary_metrics(y, p)
    pred = (p >= 0.5).astype(int)
    # by hand: TP=3 (0.9, 0.8, 0.6), FN=2 (0.3, 0.45), FP=2 (0.7, 0.55), TN=3
    assert m["confusion"] == {"tp": 3, "fn": 2, "fp": 2, "tn": 3}
    assert m["accuracy"] == pytest.approx(0.6) == skm.accuracy_score(y, pred)
    assert m["precision"] == pytest.approx(skm.precision_score(y, pred))
    assert m["recall"] == pytest.approx(0.6) and m["specificity"] == pytest.approx(0.6)
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred))
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y, p))
    # macro: both classes' precision/recall/F1 averaged, as sklearn's classification_report does
    report = skm.classification_report(y, pred, output_dict=True)["macro avg"]
    assert (m["macro_precision"], m["macro_recall"], m["macro_f1"]) == pytest.approx(
        (report["precision"], report["recall"], report["f1-score"]))
    assert m["macro_recall"] == pytest.approx(skm.balanced_accuracy_score(y, pred))


def test_bootstrap_ci_covers_the_true_rate():
    covered = 0
    for rep in range(20):
        rng = np.random.default_rng(1000 + rep)
        y = np.repeat([0, 1], 200)
        correct = rng.random(400) < 0.85  # a classifier that is right 85% of the time
        p = np.where(correct, y, 1 - y).astype(float)
        ci = bootstrap_ci(y, p, n_resamples=1000, seed=rep)["accuracy"]
        assert ci["low"] < ci["value"] < ci["high"] and ci["high"] - ci["low"] < 0.12
        covered += ci["low"] <= 0.85 <= ci["high"]
    assert covered >= 17  # nominal 95% of 20


def test_mcnemar_matches_statsmodels_and_the_binomial():
    from scipy.stats import binomtest

    y = np.zeros(30, int)
    a = np.zeros(30, int)
    b = np.zeros(30, int)
    a[:2] = 1  # a wrong on 2 images
    b[10:20] = 1  # b wrong on 10 others
    res = mcnemar_exact(y, a, b)
    assert res["a_only_wrong"] == 2 and res["b_only_wrong"] == 10
    assert res["p_value"] == pytest.approx(binomtest(2, 12, 0.5).pvalue)


def test_paired_auc_detects_a_better_model():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 150)
    good = y + rng.normal(0, 0.5, 300)
    bad = y + rng.normal(0, 2.0, 300)
    res = paired_auc_bootstrap(y, good, bad, n_resamples=500)
    assert res["auc_difference"] > 0 and res["low"] > 0 and res["p_value"] < 0.01
    preds = {n: pd.DataFrame({"path": np.arange(300), "y": y, "p_covid": 1 / (1 + np.exp(-(s - 0.5) * 3))})
             for n, s in [("good", good), ("bad", bad)]}
    table = compare_predictions(preds, n_resamples=300)
    assert len(table) == 1 and table.loc[0, "auc_p_holm"] < 0.05


def test_ece_zero_when_calibrated_and_large_when_not():
    y = np.array([1] * 80 + [0] * 20)
    assert expected_calibration_error(y, np.full(100, 0.8)) == pytest.approx(0.0)
    assert expected_calibration_error(y, np.full(100, 0.2)) == pytest.approx(0.6)


def test_seed_aggregate():
    runs = [dict.fromkeys(("accuracy", "precision", "recall", "specificity", "f1", "auc"), v) for v in (0.8, 0.9, 1.0)]
    agg = aggregate_seeds(runs)
    assert agg.loc["accuracy", "mean"] == pytest.approx(0.9) and agg.loc["accuracy", "best"] == 1.0
    # t(0.975, 2) = 4.303: 0.9 +- 4.303 * 0.1 / sqrt(3)
    assert agg.loc["accuracy", "std"] == pytest.approx(0.1)
    assert (agg.loc["accuracy", "low"], agg.loc["accuracy", "high"]) == pytest.approx((0.6516, 1.1484), abs=1e-4)
    assert np.isnan(agg.loc["macro_f1", "mean"])  # runs recorded before macro metrics existed


@pytest.fixture()
def encoded_dataset(tmp_path):
    """Each class differs in exactly one baseline feature: size for one set, brightness for another."""
    def build(kind):
        root = tmp_path / kind
        for i in range(30):
            for label, k in (("COVID", 1), ("non-COVID", 0)):
                if kind == "size":
                    write_png(root / label / f"{i}.png", size=(200 + 60 * k + i, 150 + 50 * k), seed=i + 100 * k)
                else:
                    write_png(root / label / f"{i}.png", size=(64, 64), value=60 + 120 * k + i)
        return load_dataset(root)
    return build


@pytest.mark.parametrize("kind, baseline", [("size", "size_only"), ("size", "histogram_size"),
                                            ("bright", "histogram_size"), ("bright", "nearest_neighbour")])
def test_baselines_beat_chance_when_their_feature_encodes_the_label(encoded_dataset, kind, baseline):
    ds = encoded_dataset(kind)
    preds = run_baselines(ds, make_split(ds, "random", seed=0, val_fraction=0.0), image_size=32)[baseline]
    assert binary_metrics(preds["y"], preds["p_covid"])["accuracy"] >= 0.9


def test_vectorised_bootstrap_metrics_equal_sklearn_per_resample():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 60)
    p = rng.random(60).round(1)  # ties, as real scores have
    idx = _stratified_indices(y, 20, seed=0)
    fast = _resampled_metrics(y[idx], p[idx], 0.5)
    for b in range(20):
        slow = binary_metrics(y[idx[b]], p[idx[b]])
        for name in fast:
            assert fast[name][b] == pytest.approx(slow[name]), name


# --- by independent unit: the cluster bootstrap ---------------------------------------------------


def test_weighted_metrics_equal_sklearn_on_the_expanded_resample():
    """A slice drawn k times weighs k: every metric and AUC (ties included) as sklearn computes them
    on the resample written out in full."""
    from sklearn.metrics import roc_auc_score

    from covidlib.evaluate.stats import _weighted_metrics
    from covidlib.metrics import binary_metrics

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 60)
    p = np.round(rng.random(60), 1)  # ties on purpose
    w = rng.integers(0, 4, (5, 60)).astype(float)
    got = _weighted_metrics(y, p, w, 0.5)
    for b in range(5):
        idx = np.repeat(np.arange(60), w[b].astype(int))
        want = binary_metrics(y[idx], p[idx], 0.5)
        for name in ("accuracy", "precision", "recall", "specificity", "f1", "macro_f1"):
            assert got[name][b] == pytest.approx(want[name]), name
        assert got["auc"][b] == pytest.approx(roc_auc_score(y[idx], p[idx]))


def test_the_cluster_bootstrap_counts_a_scan_once_however_many_slices_it_has():
    """Ten identical slices per scan carry the information of one: resampling scans gives the
    interval of the unique slices, resampling slices one about sqrt(10) times too narrow."""
    from covidlib.evaluate.stats import bootstrap_ci, independent_units, paired_auc_bootstrap

    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 40)
    p = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1)
    y10, p10, scans = np.repeat(y, 10), np.repeat(p, 10), np.repeat(np.arange(80), 10)

    def width(ci):
        return ci["accuracy"]["high"] - ci["accuracy"]["low"]

    unique = width(bootstrap_ci(y, p, n_resamples=2000))
    by_scan = width(bootstrap_ci(y10, p10, groups=scans, n_resamples=2000))
    by_slice = width(bootstrap_ci(y10, p10, n_resamples=2000))
    assert by_scan == pytest.approx(unique, rel=0.2)
    assert by_slice < 0.5 * by_scan
    assert independent_units(scans) == 80
    same = paired_auc_bootstrap(y10, p10, p10, groups=scans, n_resamples=200)
    assert (same["auc_difference"], same["low"], same["high"], same["units"]) == (0.0, 0.0, 0.0, 80)


def test_pairwise_comparisons_by_scan_report_the_accuracy_difference():
    from covidlib.evaluate.stats import compare_predictions

    y = np.repeat([0, 1], 30)
    paths = [f"s{i}.png" for i in range(60)]
    good = pd.DataFrame({"path": paths, "y": y, "p_covid": 0.2 + 0.6 * y})
    bad = pd.DataFrame({"path": paths, "y": y, "p_covid": np.full(60, 0.7)})
    scans = pd.Series(np.repeat(np.arange(12), 5), index=paths)
    row = compare_predictions({"good": good, "bad": bad}, groups=scans, n_resamples=300).iloc[0]
    assert row["accuracy_difference"] == pytest.approx(0.5)
    assert row["accuracy_low"] > 0 and row["auc_units"] == 12


def test_temperature_scaling_recovers_a_known_overconfidence_and_brier_matches_sklearn():
    from scipy.special import expit
    from sklearn.metrics import brier_score_loss

    from covidlib.evaluate.calibration import brier, fit_temperature, scaled
    from covidlib.evaluate.stats import expected_calibration_error

    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, 20000)
    y = (rng.random(z.size) < expit(z)).astype(int)  # P(COVID) = expit(z) is calibrated
    overconfident = expit(3 * z)  # the same ranking, three times too sure
    t = fit_temperature(y[:10000], overconfident[:10000])  # fitted on one half (validation) ...
    assert t == pytest.approx(3, rel=0.1)
    test_y, test_p = y[10000:], overconfident[10000:]  # ... applied to the other (test)
    after = scaled(test_p, t)
    assert expected_calibration_error(test_y, after) < 0.5 * expected_calibration_error(test_y, test_p)
    assert brier(test_y, test_p) == pytest.approx(brier_score_loss(test_y, test_p))
    assert brier(test_y, after) < brier(test_y, test_p)
    assert fit_temperature(y, expit(z)) == pytest.approx(1, abs=0.1)  # a calibrated model keeps T near 1
