"""Numbers that carry their uncertainty: bootstrap CIs, seed aggregates, paired tests, calibration.

COVID is the positive class (label 1) everywhere. Point metrics come from scikit-learn
(:mod:`covidlib.metrics`); the tests come from statsmodels where it has them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score, roc_curve
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import multipletests

from covidlib import CovidlibError
from covidlib.data.dataset import Dataset, load_dataset
from covidlib.data.images import decoded
from covidlib.evaluate.calibration import brier, fit_temperature, scaled
from covidlib.metrics import METRIC_NAMES, binary_metrics
from covidlib.models.contract import predict_covid
from covidlib.models.runs import RunFolder


def _resampled_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, np.ndarray]:
    """Every metric for each row of ``(B, n)`` resampled labels and scores, vectorised.
    The same definitions as :func:`covidlib.metrics.binary_metrics` (tested against it);
    AUC is the Mann-Whitney statistic from average ranks, as in ``roc_auc_score``.
    """
    pred = p >= threshold
    tp = (pred & (y == 1)).sum(1)
    fp = (pred & (y == 0)).sum(1)
    fn = (~pred & (y == 1)).sum(1)
    tn = (~pred & (y == 0)).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        recall = np.where(tp + fn > 0, tp / (tp + fn), 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
        n1, n0 = (y == 1).sum(1), (y == 0).sum(1)
        ranks = rankdata(p, axis=1)
        auc = ((ranks * (y == 1)).sum(1) - n1 * (n1 + 1) / 2) / (n1 * n0)
        specificity = tn / (tn + fp)
        npv = np.where(tn + fn > 0, tn / (tn + fn), 0.0)  # precision of the non-COVID class
        f1_non_covid = np.where(npv + specificity > 0, 2 * npv * specificity / (npv + specificity), 0.0)
        return {"accuracy": (tp + tn) / y.shape[1], "precision": precision, "recall": recall,
                "specificity": specificity, "f1": f1, "auc": auc,
                "macro_precision": (precision + npv) / 2, "macro_recall": (recall + specificity) / 2,
                "macro_f1": (f1 + f1_non_covid) / 2}


def bootstrap_ci(y_true, p_covid, *, n_resamples: int = 1000, seed: int = 0, level: float = 0.95,
                 threshold: float = 0.5, groups=None) -> dict[str, dict[str, float]]:
    """Point value and percentile CI of every metric, resampling within each class (stratified).
    With ``groups`` (one id per slice: the scan it came from), whole groups are resampled instead of
    slices: slices of one scan are not independent, and resampling them one by one gives intervals
    that are too narrow (a cluster bootstrap, stratified by each group's class).
    """
    y_true = np.asarray(y_true, int)
    p_covid = np.asarray(p_covid, float)
    if groups is None:
        idx = _stratified_indices(y_true, n_resamples, seed)
        samples = _resampled_metrics(y_true[idx], p_covid[idx], threshold)
    else:
        samples = _weighted_metrics(y_true, p_covid, _cluster_weights(y_true, groups, n_resamples, seed), threshold)
    point = binary_metrics(y_true, p_covid, threshold)
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    return {name: {"value": point[name], "low": float(np.nanpercentile(samples[name], lo)),
                   "high": float(np.nanpercentile(samples[name], hi))} for name in METRIC_NAMES}


def independent_units(groups) -> int:
    """How many independent units (scans) a test set holds: what its intervals rest on."""
    return int(len(np.unique(np.asarray(groups))))


def _cluster_weights(y_true: np.ndarray, groups, n_resamples: int, seed: int) -> np.ndarray:
    """``(n_resamples, n)`` weights: how often each slice's group was drawn, groups drawn with
    replacement within each class (a group's class: the class of most of its slices)."""
    codes, inverse = np.unique(np.asarray(groups), return_inverse=True)
    group_label = np.rint(np.bincount(inverse, weights=y_true) / np.bincount(inverse)).astype(int)
    rng = np.random.default_rng(seed)
    counts = np.zeros((n_resamples, len(codes)))
    for label in (0, 1):
        members = np.nonzero(group_label == label)[0]
        if len(members):
            draws = rng.choice(members, (n_resamples, len(members)))
            np.add.at(counts, (np.arange(n_resamples)[:, None], draws), 1)
    return counts[:, inverse]


def _weighted_metrics(y: np.ndarray, p: np.ndarray, w: np.ndarray, threshold: float) -> dict[str, np.ndarray]:
    """Every metric for each row of ``(B, n)`` slice weights over one set of labels and scores: the
    same definitions as :func:`_resampled_metrics` on the expanded resample (tested against sklearn).
    AUC is the weighted Mann-Whitney statistic, ties counting one half."""
    pos, pred = y == 1, p >= threshold
    tp, fp = (w * (pred & pos)).sum(1), (w * (pred & ~pos)).sum(1)
    fn, tn = (w * (~pred & pos)).sum(1), (w * (~pred & ~pos)).sum(1)
    values, level = np.unique(p, return_inverse=True)
    neg_at = np.zeros((len(w), len(values)))
    np.add.at(neg_at.T, level[~pos], w[:, ~pos].T)  # each score level's negative weight
    below = np.cumsum(neg_at, axis=1) - neg_at
    wins = (w[:, pos] * (below[:, level[pos]] + 0.5 * neg_at[:, level[pos]])).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        recall = np.where(tp + fn > 0, tp / (tp + fn), 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
        specificity = tn / (tn + fp)
        npv = np.where(tn + fn > 0, tn / (tn + fn), 0.0)
        f1_non_covid = np.where(npv + specificity > 0, 2 * npv * specificity / (npv + specificity), 0.0)
        return {"accuracy": (tp + tn) / w.sum(1), "precision": precision, "recall": recall,
                "specificity": specificity, "f1": f1, "auc": wins / ((tp + fn) * (tn + fp)),
                "macro_precision": (precision + npv) / 2, "macro_recall": (recall + specificity) / 2,
                "macro_f1": (f1 + f1_non_covid) / 2}


def mean_ci(values, *, n_resamples: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """Mean and percentile bootstrap CI of per-item values (e.g. a sanity score per slice); NaNs left out."""
    v = np.asarray(values, float)
    v = v[~np.isnan(v)]
    if not len(v):
        return {"value": float("nan"), "low": float("nan"), "high": float("nan")}
    means = v[np.random.default_rng(seed).integers(0, len(v), (n_resamples, len(v)))].mean(axis=1)
    lo, hi = np.percentile(means, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    return {"value": float(v.mean()), "low": float(lo), "high": float(hi)}


def _stratified_indices(y_true: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """``(n_resamples, n)`` bootstrap indices that keep each class's count fixed."""
    rng = np.random.default_rng(seed)
    pos, neg = np.nonzero(y_true == 1)[0], np.nonzero(y_true == 0)[0]
    return np.hstack([rng.choice(pos, (n_resamples, len(pos))), rng.choice(neg, (n_resamples, len(neg)))])


def aggregate_seeds(metric_dicts: list[dict]) -> pd.DataFrame:
    """Mean, standard deviation and t-based 95% CI of each metric over runs with different seeds."""
    df = pd.DataFrame([{k: d.get(k, np.nan) for k in METRIC_NAMES} for d in metric_dicts])  # older runs: no macro
    n = len(df)
    half = stats.t.ppf(0.975, n - 1) * df.std(ddof=1) / np.sqrt(n) if n > 1 else df.std() * np.nan
    return pd.DataFrame({"mean": df.mean(), "std": df.std(ddof=1), "low": df.mean() - half,
                         "high": df.mean() + half, "best": df.max(), "runs": n})


def mcnemar_exact(y_true, pred_a, pred_b) -> dict:
    """Exact McNemar test on the discordant pairs of two classifiers on the same images."""
    y_true = np.asarray(y_true)
    ca, cb = np.asarray(pred_a) == y_true, np.asarray(pred_b) == y_true
    table = [[int((ca & cb).sum()), int((ca & ~cb).sum())], [int((~ca & cb).sum()), int((~ca & ~cb).sum())]]
    res = mcnemar(table, exact=True)
    return {"b_only_wrong": table[0][1], "a_only_wrong": table[1][0], "p_value": float(res.pvalue)}


def paired_auc_bootstrap(y_true, p_a, p_b, *, n_resamples: int = 1000, seed: int = 0, groups=None) -> dict:
    """AUC(a) - AUC(b) with a paired, stratified bootstrap CI and two-sided p-value; with ``groups``,
    whole groups (scans) are resampled, the same draw for both models."""
    y_true, p_a, p_b = np.asarray(y_true, int), np.asarray(p_a, float), np.asarray(p_b, float)
    if groups is None:
        idx = _stratified_indices(y_true, n_resamples, seed)
        diffs = (_resampled_metrics(y_true[idx], p_a[idx], 0.5)["auc"]
                 - _resampled_metrics(y_true[idx], p_b[idx], 0.5)["auc"])
    else:
        w = _cluster_weights(y_true, groups, n_resamples, seed)
        diffs = _weighted_metrics(y_true, p_a, w, 0.5)["auc"] - _weighted_metrics(y_true, p_b, w, 0.5)["auc"]
    observed = roc_auc_score(y_true, p_a) - roc_auc_score(y_true, p_b)
    p = 2 * min((diffs <= 0).mean(), (diffs >= 0).mean())
    return {"auc_difference": float(observed), "low": float(np.nanpercentile(diffs, 2.5)),
            "high": float(np.nanpercentile(diffs, 97.5)), "p_value": float(min(1.0, p)),
            "units": independent_units(groups) if groups is not None else len(y_true)}


def paired_accuracy_bootstrap(y_true, p_a, p_b, groups, *, n_resamples: int = 1000, seed: int = 0) -> dict:
    """Accuracy(a) - accuracy(b) with a cluster bootstrap CI: the comparison McNemar makes on slices,
    made on scans (McNemar treats every slice as independent and overstates its evidence)."""
    y_true, p_a, p_b = np.asarray(y_true, int), np.asarray(p_a, float), np.asarray(p_b, float)
    w = _cluster_weights(y_true, groups, n_resamples, seed)
    diffs = _weighted_metrics(y_true, p_a, w, 0.5)["accuracy"] - _weighted_metrics(y_true, p_b, w, 0.5)["accuracy"]
    observed = float(((p_a >= 0.5) == y_true).mean() - ((p_b >= 0.5) == y_true).mean())
    p = 2 * min((diffs <= 0).mean(), (diffs >= 0).mean())
    return {"accuracy_difference": observed, "low": float(np.percentile(diffs, 2.5)),
            "high": float(np.percentile(diffs, 97.5)), "p_value": float(min(1.0, p)),
            "units": independent_units(groups)}


def compare_predictions(preds: dict[str, pd.DataFrame], *, seed: int = 0, n_resamples: int = 1000,
                        groups: pd.Series | None = None) -> pd.DataFrame:
    """All pairs of models on the same test images: slice-level McNemar and paired AUC, Holm-corrected.
    With ``groups`` (path -> scan id), the paired AUC difference is a cluster bootstrap and the
    accuracy difference gets one too (``accuracy_*``): the comparison by independent unit. McNemar
    stays, labelled slice-level, since it counts every slice as independent.
    """
    names = list(preds)
    rows = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            pa, pb = preds[a].set_index("path"), preds[b].set_index("path")
            if set(pa.index) != set(pb.index):
                raise CovidlibError(f"runs {a} and {b} were tested on different images; compare runs on one split")
            pb = pb.loc[pa.index]
            y, units = pa["y"].to_numpy(), None if groups is None else groups.loc[pa.index].to_numpy()
            mc = mcnemar_exact(y, pa["p_covid"] >= 0.5, pb["p_covid"] >= 0.5)
            auc = paired_auc_bootstrap(y, pa["p_covid"], pb["p_covid"], seed=seed, n_resamples=n_resamples, groups=units)
            row = {"a": a, "b": b, "mcnemar_p": mc["p_value"], **{f"auc_{k}": v for k, v in auc.items()}}
            if units is not None:
                acc = paired_accuracy_bootstrap(y, pa["p_covid"], pb["p_covid"], units, seed=seed, n_resamples=n_resamples)
                row.update({"accuracy_difference": acc["accuracy_difference"], "accuracy_low": acc["low"],
                            "accuracy_high": acc["high"], "accuracy_p_value": acc["p_value"]})
            rows.append(row)
    df = pd.DataFrame(rows)
    if len(df):
        df["mcnemar_p_holm"] = multipletests(df["mcnemar_p"], method="holm")[1]
        df["auc_p_holm"] = multipletests(df["auc_p_value"], method="holm")[1]
        if "accuracy_p_value" in df:
            df["accuracy_p_holm"] = multipletests(df["accuracy_p_value"], method="holm")[1]
    return df


def expected_calibration_error(y_true, p_covid, n_bins: int = 10) -> float:
    """Weighted mean |accuracy - confidence| over equal-width bins of P(COVID)."""
    y_true, p = np.asarray(y_true, float), np.asarray(p_covid, float)
    bins = np.minimum((p * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        mask = bins == b
        if mask.any():
            ece += mask.mean() * abs(y_true[mask].mean() - p[mask].mean())
    return float(ece)


def youden_threshold(y_true, p_covid) -> float:
    """The threshold maximising sensitivity + specificity - 1 (choose it on validation data)."""
    fpr, tpr, thr = roc_curve(y_true, p_covid)
    return float(np.clip(thr[np.argmax(tpr - fpr)], 0, 1))


def load_run(run: str | Path) -> tuple[dict, pd.DataFrame]:
    """A finished run folder's record and test predictions, with a one-line error otherwise."""
    folder = RunFolder(run)
    preds = folder.predictions()
    return folder.record(), preds


def test_predictions(run: str | Path) -> pd.DataFrame:
    """The test rows of a run's predictions (path, y, p_covid)."""
    _, preds = load_run(run)
    if "split" in preds:
        preds = preds[preds["split"] == "test"]
    return preds[["path", "y", "p_covid"]].reset_index(drop=True)


def predict_folder(run: str | Path, data, *, skip_bad: bool = False) -> pd.DataFrame:
    """A run's model on every image of another folder or loaded Dataset (external test), without retraining."""
    folder = RunFolder(run)
    config = folder.config()
    dataset = data if isinstance(data, Dataset) else load_dataset(data, skip_bad=skip_bad)
    cache = decoded(dataset, config.input_size, config.resize, lungs=config.lungs)
    p = predict_covid(folder.load_model(), cache.images)
    return pd.DataFrame({"path": cache.paths, "y": cache.labels, "p_covid": p})


def summarise(preds: pd.DataFrame, *, val: pd.DataFrame | None = None, n_resamples: int = 1000,
              seed: int = 0, units: pd.Series | None = None) -> dict:
    """Metrics with CIs at 0.5, calibration, and (when validation predictions exist) the
    Youden threshold chosen on validation and applied to test, reported separately. With ``units``
    (path -> scan), the intervals resample scans, and ``units`` counts them."""
    groups = None if units is None else units.loc[preds["path"]].to_numpy()
    out = {"positive_class": "COVID", "n": int(len(preds)),
           "units": independent_units(groups) if groups is not None else int(len(preds)),
           "resampled": "scans" if groups is not None else "slices",
           "metrics": bootstrap_ci(preds["y"], preds["p_covid"], n_resamples=n_resamples, seed=seed, groups=groups),
           "ece": expected_calibration_error(preds["y"], preds["p_covid"]),
           "confusion": binary_metrics(preds["y"], preds["p_covid"])["confusion"]}
    if val is not None and len(val) and val["y"].nunique() == 2:
        thr = youden_threshold(val["y"], val["p_covid"])
        out["youden"] = {"threshold": thr, "chosen_on": "validation",
                         "metrics": binary_metrics(preds["y"], preds["p_covid"], thr)}
    return out


def evaluate_run(run: str | Path, data: str | Path | None = None, *, n_resamples: int = 1000, seed: int = 0,
                 skip_bad: bool = False) -> dict:
    """A run on its own test split, or (with ``data``) on an external folder."""
    record, preds = load_run(run)
    if data is None:
        test = preds[preds["split"] == "test"] if "split" in preds else preds
        val = preds[preds["split"] == "val"] if "split" in preds else None
        result = summarise(test, val=val, n_resamples=n_resamples, seed=seed, units=RunFolder(run).units())
        result["evaluated_on"] = "test split"
        return result
    ext_data = load_dataset(data, skip_bad=skip_bad)
    overlap = check_external(run, ext_data)
    external = predict_folder(run, ext_data)
    result = summarise(external, n_resamples=n_resamples, seed=seed)
    ext = ext_data.manifest
    result["shared_with_training_data"] = overlap
    result["evaluated_on"] = str(data)
    result["image_sizes"] = {
        "external": {"width": _quartiles(ext["width"]), "height": _quartiles(ext["height"])},
        "training_data": record.get("data", {}).get("size_quartiles"),
    }
    return result


def check_external(run: str | Path, external) -> int:
    """Refuse the run's own training data as an "external" test (same manifest hash); warn, in one
    line, when the external folder shares byte-identical images with it. Returns that count."""
    trained_on = RunFolder(run).record().get("data", {})
    if external.manifest_hash == trained_on.get("manifest_hash"):
        raise CovidlibError(f"--data {external.root} is the dataset {Path(run).name} was trained on (same manifest "
                            "hash), not an external test; leave out --data to evaluate on its test split")
    overlap = _shared_images(external, trained_on.get("root"))
    if overlap:
        print(f"covidlib: warning: {overlap} of {len(external.manifest)} images in {external.root} are byte-identical "
              f"to images in the training data {trained_on['root']}; the external result is optimistic", file=sys.stderr)
    return overlap


def _shared_images(external, training_root: str | None) -> int:
    """How many external images are byte-identical to one of the training dataset's (0 if it is gone)."""
    if not training_root or not Path(training_root).is_dir():
        return 0
    try:
        known = set(load_dataset(training_root).manifest["sha256"])
    except CovidlibError:
        return 0
    return int(external.manifest["sha256"].isin(known).sum())


def _quartiles(values) -> list[float]:
    return [float(v) for v in np.percentile(np.asarray(values, float), [0, 25, 50, 75, 100])]


def _temperature_scaled(run: str | Path | None, test: pd.DataFrame) -> dict:
    """A CNN run's temperature fitted on its validation slices and its test ECE and Brier after it."""
    if run is None:
        return {}
    preds = RunFolder(run).predictions()
    val = preds[preds["split"] == "val"] if "split" in preds else preds.iloc[:0]
    if val["y"].nunique() < 2:
        return {}
    t = fit_temperature(val["y"], val["p_covid"])
    p = scaled(test["p_covid"], t)
    return {"temperature": t, "ece_scaled": expected_calibration_error(test["y"], p), "brier_scaled": brier(test["y"], p)}


def compare_runs(runs: dict[str, str | Path], extra: dict[str, pd.DataFrame] | None = None, *,
                 n_resamples: int = 1000, seed: int = 0, pairs: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One table (metrics with CIs, ECE, cost) and the pairwise tests for runs on one test set.
    ``extra`` adds prediction tables of other models (the shortcut baselines). On a split that kept
    scans whole, every interval and paired comparison resamples scans (``units`` says how many).
    """
    units = RunFolder(next(iter(runs.values()))).units() if runs else None
    preds, facts = {}, {}
    for name, run in runs.items():
        record, _ = load_run(run)
        preds[name] = test_predictions(run)
        facts[name] = {"kind": "cnn", "parameters": record.get("parameters"),
                       "train_seconds": record.get("train_seconds"),
                       "images_per_second": record.get("inference_images_per_second")}
    for name, df in (extra or {}).items():
        preds[name] = df
        facts[name] = {"kind": "baseline"}
    rows = {}
    for name, df in preds.items():
        groups = None if units is None else units.loc[df["path"]].to_numpy()
        ci = bootstrap_ci(df["y"], df["p_covid"], n_resamples=n_resamples, seed=seed, groups=groups)
        row = {**facts[name], "n": len(df), "units": len(df) if groups is None else independent_units(groups)}
        for metric, v in ci.items():
            row[metric], row[f"{metric}_low"], row[f"{metric}_high"] = v["value"], v["low"], v["high"]
        row["ece"], row["brier"] = expected_calibration_error(df["y"], df["p_covid"]), brier(df["y"], df["p_covid"])
        row.update(_temperature_scaled(runs.get(name), df))
        rows[name] = row
    table = pd.DataFrame.from_dict(rows, orient="index")
    tests = (compare_predictions(preds, seed=seed, n_resamples=n_resamples, groups=units) if pairs and len(preds) > 1
             else pd.DataFrame())
    return table, tests
