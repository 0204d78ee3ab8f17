"""Tables a reader meets: the paper's Table 1 beside ours, like for like, with human labels.

Every cell is a percentage with its 95% CI, "95.8 (94.0-97.6)". Table 1's precision, recall
and F1 are shown macro-averaged over the two classes (how the paper most plausibly computed
them: several of its rows have equal accuracy, precision, recall and F1) or for COVID as the
positive class. With several seeds per model a cell is "mean ± sd, best B" over the seeds (the
best is the counterpart of the paper's best of trials); each seed's bootstrap CI is on its own page.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from covidlib.models.architectures import ARCHITECTURES
from covidlib.vocabulary import SPLIT_KINDS

# Table 1 of the paper (best of several trials, %, test split); ../shared/PAPER.md.
PAPER_TABLE = pd.DataFrame(
    [("basic_cnn", 96.57, 96.4, 96.3, 96.2, 98.65), ("alexnet", 97.4, 97.4, 97.4, 97.39, 99.0),
     ("vgg16", 97.18, 97.17, 97.13, 97.09, 98.88), ("vgg19", 97.00, 97.00, 96.64, 96.9, 98.81),
     ("mobilenet", 96.4, 96.4, 96.4, 96.3, 97.99), ("resnet101", 96.78, 96.78, 96.78, 96.78, 98.01),
     ("resnet152", 95.5, 95.5, 95.5, 95.5, 97.64), ("densenet201", 93, 93, 93, 93, 95.54),
     ("inceptionv3", 95.6, 95.6, 95.6, 95.6, 97.3)],
    columns=["arch", "accuracy", "precision", "f1", "recall", "auc"]).set_index("arch")

# Table 1's column order, with the name of our metric under each averaging.
TABLE1_METRICS = {"ACC": "accuracy", "PRE": "precision", "REC": "recall", "F1": "f1", "AUC": "auc"}
AVERAGING = {"macro": "macro-averaged over both classes", "covid": "COVID as the positive class"}
BASELINE_TITLES = {"size_only": "Image size (random forest)", "histogram_size": "Grey histogram + size (random forest)",
                   "histogram_lungs": "Grey histograms in / out of the lungs (random forest)",
                   "nearest_neighbour": "1-NN on 32x32 pixels"}


def percent_ci(value: float, low: float, high: float, digits: int = 1) -> str:
    """``0.958, 0.94, 0.976`` -> ``"95.8 (94.0-97.6)"``; NaN -> an en dash."""
    if value is None or np.isnan(value):
        return "–"
    return f"{100 * value:.{digits}f} ({100 * low:.{digits}f}-{100 * high:.{digits}f})"


def title(name: str) -> str:
    """A model's or baseline's human name: ``densenet201`` -> ``DenseNet201``."""
    if name in ARCHITECTURES:
        return ARCHITECTURES[name].title
    return BASELINE_TITLES.get(name, name)


def _metric(metric: str, averaging: str) -> str:
    if averaging not in AVERAGING:
        raise ValueError(f"averaging must be one of {', '.join(AVERAGING)}, not {averaging!r}")
    return f"macro_{metric}" if averaging == "macro" and metric in ("precision", "recall", "f1") else metric


def _cell(rows: pd.DataFrame, metric: str) -> str:
    """One model's runs (one per seed) -> one cell."""
    if metric not in rows or rows[metric].isna().all():
        return "–"
    if len(rows) == 1:
        r = rows.iloc[0]
        return percent_ci(r[metric], r[f"{metric}_low"], r[f"{metric}_high"])
    v = 100 * rows[metric]
    return f"{v.mean():.1f} ± {v.std(ddof=1):.1f}, best {v.max():.1f}"


def table1(runs: pd.DataFrame, averaging: str = "macro", split_kind: str = "random") -> pd.DataFrame:
    """The paper's Table 1 beside ours: one row per architecture, a (metric, source) column pair.
    ``runs`` is one row per CNN run (:func:`covidlib.evaluate.compare_runs`' table) with the
    columns ``arch``, ``mode``, ``weights``, ``input_size`` and ``seed`` added. Each row says whether
    it ran as the paper's did (:func:`like_for_like`); no mean row: an average over rows that ran
    unlike the paper's says nothing about the paper's average.
    """
    out = {}
    order = {name: i for i, name in enumerate(ARCHITECTURES)}  # the paper's order
    runs = runs.sort_values("arch", key=lambda a: a.map(order), kind="stable")
    for arch, rows in runs.groupby("arch", sort=False):
        first = rows.iloc[0]
        row = {("Model", ""): title(arch),
               ("Mode, weights, input", ""): f"{first['mode']}, {first['weights']}, {int(first['input_size'])} px",
               ("Like the paper's row?", ""): like_for_like(arch, first["mode"], first["weights"],
                                                            int(first["input_size"]), split_kind),
               ("Seeds", ""): len(rows)}
        for label, metric in TABLE1_METRICS.items():
            paper = PAPER_TABLE[metric].get(arch, np.nan)
            row[(label, "paper")] = "–" if np.isnan(paper) else f"{paper:.2f}"
            row[(label, "ours")] = _cell(rows, _metric(metric, averaging))
        out[arch] = row
    table = pd.DataFrame(list(out.values()), dtype=object)
    table.columns = pd.MultiIndex.from_tuples(table.columns)
    return table


def like_for_like(arch: str, mode: str, weights: str, input_size: int, split_kind: str = "random") -> str:
    """``yes`` when a run of ours was trained as the paper's row was (on a random split of slices,
    from scratch for the two models it built by hand, from ImageNet weights for the seven backbones,
    at the paper's input size); otherwise ``no:`` and the first reason."""
    paper = ARCHITECTURES[arch]
    if split_kind != "random":
        return f"no: the {split_kind} split"
    if mode == "frozen" and weights == "none":
        return "no: a frozen random backbone"
    if paper.backbone and weights != "imagenet":
        return "no: no ImageNet weights"
    if input_size < paper.input_size:
        return f"no: {input_size} px, the paper's {paper.input_size}"
    return "yes"


def models_table(table: pd.DataFrame) -> pd.DataFrame:
    """Every CNN and shortcut baseline on one test split: what a reader compares, labelled."""
    out = _named(table)
    for label, metric in (("Accuracy", "accuracy"), ("Sensitivity", "recall"), ("Specificity", "specificity"),
                          ("AUC", "auc")):
        out[f"{label} % (95% CI)"] = _with_ci(table, metric)
    out["ECE"] = [f"{v:.3f}" for v in table["ece"]]
    out["Brier"] = [f"{v:.3f}" for v in table["brier"]]
    if "temperature" in table:  # fitted on validation slices; the baselines have none
        out["ECE, temperature-scaled (T)"] = ["–" if pd.isna(t) else f"{e:.3f} (T {t:.2f})"
                                             for e, t in zip(table["ece_scaled"], table["temperature"])]
    if "train_seconds" in table:
        out["Training (s)"] = ["–" if pd.isna(v) else f"{v:.0f}" for v in table["train_seconds"]]
    return out


def run_facts(configs: dict) -> pd.DataFrame:
    """arch, mode, weights, input_size and seed of each run (run name -> its RunConfig)."""
    return pd.DataFrame.from_dict(
        {name: {k: getattr(c, k) for k in ("arch", "mode", "weights", "input_size", "seed")}
         for name, c in configs.items()}, orient="index")



def pairs_table(pairs: pd.DataFrame) -> pd.DataFrame:
    """The pairwise tests, labelled: McNemar on discordant slices and the paired AUC difference."""
    if not len(pairs):
        return pd.DataFrame()
    return pd.DataFrame({
        "Model A": pairs["a"].map(title), "Model B": pairs["b"].map(title),
        "McNemar p (Holm)": pairs["mcnemar_p_holm"].map(lambda p: f"{p:.3g}"),
        "AUC A - B (95% CI)": [f"{d:+.3f} ({lo:+.3f} to {hi:+.3f})" for d, lo, hi in
                               zip(pairs["auc_auc_difference"], pairs["auc_low"], pairs["auc_high"])],
        "AUC p (Holm)": pairs["auc_p_holm"].map(lambda p: f"{p:.3g}")})


METRIC_TITLES = {"accuracy": "Accuracy", "precision": "Precision (COVID)", "recall": "Sensitivity (recall, COVID)",
                 "specificity": "Specificity", "f1": "F1 (COVID)", "auc": "AUC", "macro_precision": "Precision (macro)",
                 "macro_recall": "Recall (macro)", "macro_f1": "F1 (macro)"}


def run_metrics_table(ci: pd.DataFrame) -> pd.DataFrame:
    """One run's metrics (index: metric; columns value, low, high) as "Metric | % (95% CI)"."""
    return pd.DataFrame({"Metric": [METRIC_TITLES.get(m, m) for m in ci.index],
                         "Test % (95% CI)": [percent_ci(r["value"], r["low"], r["high"]) for _, r in ci.iterrows()]})


def settings_table(config, versions: dict | None = None) -> pd.DataFrame:
    """A run's settings as a reader reads them: data as its folder's name, files by name, no
    machine paths; then the versions in use."""

    rows = {}
    for key, value in asdict(config).items():
        if key in ("data", "split", "preset", "out") and value:
            value = Path(value).name
        if value is not None and value != {}:
            rows[key] = value
    for key in ("python", "tensorflow", "keras", "covidlib", "plotly_renderer"):
        if versions and key in versions:
            rows[key] = versions[key]
    return pd.DataFrame({"Setting": list(rows), "Value": [str(v) for v in rows.values()]})


def _with_ci(table: pd.DataFrame, prefix: str) -> list[str]:
    return [percent_ci(r[prefix], r[f"{prefix}_low"], r[f"{prefix}_high"]) if prefix in r else "–"
            for _, r in table.iterrows()]


def _named(table: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({"Model": [title(n) for n in table.index],
                         "Kind": table["kind"].map({"cnn": "CNN", "baseline": "shortcut baseline"}).to_numpy()})


def leakage_display(leak: pd.DataFrame) -> pd.DataFrame:
    """Random against scan split, per model: accuracy with CIs and the drop in points."""
    out = _named(leak)
    for kind in SPLIT_KINDS:
        if f"{kind}_accuracy" in leak:
            out[f"{kind.capitalize()} split accuracy % (95% CI)"] = _with_ci(leak, f"{kind}_accuracy")
    if "accuracy_drop" in leak:
        out["Drop (points)"] = [f"{100 * d:+.1f}" for d in leak["accuracy_drop"]]
    return out


def fold_display(summary: pd.DataFrame) -> pd.DataFrame:
    """Scan cross-validation per model: accuracy and AUC as mean ± sd over folds, and the range."""
    out = _named(summary)
    out["Folds"] = summary["folds"].to_numpy()
    out["Accuracy % (mean ± sd)"] = [f"{100 * m:.1f} ± {100 * s:.1f}" for m, s in
                                     zip(summary["accuracy_mean"], summary["accuracy_sd"])]
    out["Lowest-highest fold %"] = [f"{100 * lo:.1f}-{100 * hi:.1f}" for lo, hi in
                                    zip(summary["accuracy_min"], summary["accuracy_max"])]
    out["AUC (mean ± sd)"] = [f"{m:.3f} ± {s:.3f}" for m, s in zip(summary["auc_mean"], summary["auc_sd"])]
    return out


LUNG_VIEW_TITLES = {"whole": "Whole slice", "no_lungs": "Lungs blacked out", "lungs_only": "Lungs only"}


def masked_display(table: pd.DataFrame) -> pd.DataFrame:
    """The lung-masked experiment: one row per model and split, one accuracy column per view."""
    wide = table.pivot_table(index=["split", "model"], columns="view", values=["accuracy", "accuracy_low",
                             "accuracy_high"], sort=False)
    out = pd.DataFrame({"Split": [f"{kind} split" for kind, _ in wide.index],
                        "Model": [title(name) for _, name in wide.index]})
    for view, label in LUNG_VIEW_TITLES.items():
        if ("accuracy", view) in wide:
            out[f"{label}: accuracy % (95% CI)"] = [
                percent_ci(r[("accuracy", view)], r[("accuracy_low", view)], r[("accuracy_high", view)])
                for _, r in wide.iterrows()]
    return out


def external_display(ext: pd.DataFrame) -> pd.DataFrame:
    """Internal test accuracy beside the external test's accuracy, sensitivity, specificity, AUC."""
    out = _named(ext)
    out["Internal accuracy %"] = [f"{100 * v:.1f}" for v in ext["internal_accuracy"]]
    for label, m in (("accuracy", "accuracy"), ("sensitivity", "recall"), ("specificity", "specificity"),
                     ("AUC", "auc")):
        out[f"External {label} % (95% CI)"] = _with_ci(ext, f"external_{m}")
    return out


def split_display(facts: pd.DataFrame) -> pd.DataFrame:
    """How many test slices of each split have a near-duplicate or a scan neighbour in train, and
    the units its confidence intervals resample."""
    if facts is None or not len(facts):
        return pd.DataFrame()
    return pd.DataFrame({
        "Split": [f"{k} split" for k in facts.index], "Test slices": facts["test images"].to_numpy(),
        "With a near-duplicate in train": [f"{n} ({100 * f:.1f}%)" for n, f in
                                           zip(facts["with a near-duplicate in train"], facts["fraction"])],
        "Near-duplicate: Hamming distance <=": [f"{t} bits" for t in facts["threshold (bits)"]],
        **{f"With a scan neighbour (±{r} file numbers) in train": [
            "–" if pd.isna(n) else f"{int(n)} ({100 * f:.1f}%)"
            for n, f in zip(facts[f"with a scan neighbour within {r}"], facts[f"scan fraction within {r}"])]
           for r in (1, 3)},
        "Units the intervals resample": [f"{n} {'scans' if kind == 'scan' else 'slices'}"
                                         for kind, n in zip(facts.index, facts["test units"])]})


def dataset_display(summary: dict) -> pd.DataFrame:
    """A dataset's counts and image sizes (``Dataset.summary()``)."""
    rows = {"Images": summary["images"], **{f"{k} slices": v for k, v in summary["counts"].items()},
            "Width (px)": "{}-{}".format(*summary["width"]), "Height (px)": "{}-{}".format(*summary["height"]),
            "Distinct sizes": summary["distinct_sizes"]}
    return pd.DataFrame({"": list(rows), "Value": [str(v) for v in rows.values()]})


SANITY_TITLES = {"spearman_top_gradcam": "Grad-CAM rank correlation, top layer re-initialised (low: passes)",
                 "spearman_all_gradcam": "Grad-CAM rank correlation, every layer re-initialised",
                 "blank_all_gradcam": "Grad-CAM maps blank, every layer re-initialised %",
                 "spearman_all_saliency": "Saliency rank correlation, every layer re-initialised",
                 "spearman_all_heatmap": "Activation heat map rank correlation, every layer re-initialised",
                 "deletion_gap_black": "Deletion gap, to black (random − map AUC; above 0: faithful)",
                 "deletion_gap_blur": "Deletion gap, to blur",
                 "insertion_gap_black": "Insertion gap, from black (map − random AUC)",
                 "lung_share": "Map mass in the lung fields %",
                 "lung_share_uniform": "Uniform map's %"}


def mean_ci_text(value: float, low: float, high: float, digits: int = 2) -> str:
    """``0.123, 0.1, 0.15`` -> ``"0.12 (0.10 to 0.15)"``: "to", since the values can be negative."""
    if value is None or np.isnan(value):
        return "–"
    return f"{value:.{digits}f} ({low:.{digits}f} to {high:.{digits}f})"


def sanity_display(checks: dict[str, dict]) -> pd.DataFrame:
    """Per model: the randomisation, deletion / insertion and lung-share checks as means over the
    checked slices with 95% bootstrap CIs. Rank correlations are over the slices whose maps are not
    blank; the blank share is shown beside them, as a blank map has no ranking to compare."""
    df = pd.DataFrame(checks).T
    out = pd.DataFrame({"Model": [title(n) for n in df.index],
                        "Slices": [f"{int(r['slices'])}" for _, r in df.iterrows()]})
    for column, label in SANITY_TITLES.items():
        if column not in df:  # a check run on fewer methods
            continue
        scale = 100 if column.startswith(("lung", "blank")) else 1
        out[label] = [percent_ci(r[column], r[f"{column}_low"], r[f"{column}_high"], digits=0) if scale == 100
                      else mean_ci_text(r[column], r[f"{column}_low"], r[f"{column}_high"]) for _, r in df.iterrows()]
    return out
