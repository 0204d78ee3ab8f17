"""The findings in words: each sentence is built from the numbers it states, so the prose follows the results."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from covidlib.evaluate.tables import title
from covidlib.vocabulary import SPLIT_KINDS


def threshold_sentence(summary: dict) -> str:
    """Calibration and the validation-chosen threshold, in words."""
    text = f"Expected calibration error on test: {summary['ece']:.3f}."
    youden = summary.get("youden")
    if youden:
        m = youden["metrics"]
        text += (f" At the threshold chosen on the validation slices (Youden's J, {youden['threshold']:.2f} instead of "
                 f"0.50), test sensitivity is {100 * m['recall']:.1f}% and specificity {100 * m['specificity']:.1f}%.")
    return text


def _span(values: pd.Series, fmt: str, sep: str = "-") -> str:
    low, high = format(values.min(), fmt), format(values.max(), fmt)
    return low if low == high else f"{low}{sep}{high}"


def _above_zero(df: pd.DataFrame, column: str) -> int:
    return int((df[f"{column}_low"] > 0).sum())


def sanity_sentence(checks: dict[str, dict]) -> str:
    """What the randomisation, deletion and lung-share checks found over all models, in words."""
    if not checks:
        return "No model's maps were checked in this build."
    df = pd.DataFrame(checks).T.astype(float)
    n = len(df)
    slices = f"{int(df['slices'].min())}" if df["slices"].nunique() == 1 else _span(df["slices"], ".0f")
    return (f"Each of the {n} models was checked on {slices} test slices (COVID and non-COVID, chosen by the split). "
            f"Deleting pixels in the map's order lowered the explained class's probability faster than a random "
            f"order of the map's own cells, with the 95% CI of the gap above zero, for {_above_zero(df, 'deletion_gap_black')} of {n} models "
            f"when deleting to black and {_above_zero(df, 'deletion_gap_blur')} of {n} when deleting to a blurred copy. "
            + _randomisation_words(df) + " The maps put "
            f"{_span(100 * df['lung_share'], '.0f')}% of their mass inside the lung fields, where a uniform map puts "
            f"{100 * df['lung_share_uniform'].mean():.0f}%; for {_above_zero(df, 'lung_gap')} of {n} models the share "
            f"was above uniform with the CI above zero.")


RANDOMISED_METHODS = {"gradcam": "Grad-CAM", "saliency": "saliency", "heatmap": "activation heat maps"}


def _randomisation_words(df: pd.DataFrame) -> str:
    """The randomisation test in words: Grad-CAM after the top layer and after every layer is
    re-initialised, then every other method checked, each with its share of blank maps (left out of
    the correlation, not counted as 0)."""
    parts = []
    for method, name in RANDOMISED_METHODS.items():
        if f"spearman_all_{method}" not in df:
            continue
        blank = f"{100 * df[f'blank_all_{method}'].max():.0f}%"
        parts.append(f"{_span(df[f'spearman_all_{method}'], '.2f', ' to ')} for {name} (at most {blank} of its "
                     "maps blank)")
    top = (f"After the top layer was re-initialised with its own initialisers, Grad-CAM's mean rank correlation "
           f"with the trained maps was {_span(df['spearman_top_gradcam'], '.2f', ' to ')} across models. "
           if "spearman_top_gradcam" in df else "")
    return (top + "After every layer was, the correlation was " + ", ".join(parts) + " (near 1: the map barely "
            "depends on what the model learned; blank maps have no ranking and are left out of the mean).")


def table1_sentence(table1: pd.DataFrame) -> str:
    """Which rows of Table 1 compare like with like, with our accuracy beside the paper's; the rest
    are named as not comparable (no mean over unlike rows)."""
    if table1 is None or not len(table1):
        return "No model ran, so Table 1 has no row of ours."
    like = table1[table1[("Like the paper's row?", "")] == "yes"]
    unlike = len(table1) - len(like)
    rest = (f" The other {unlike} row{'s' if unlike > 1 else ''} ran unlike the paper's (each says why) and "
            "cannot be set against its numbers." if unlike else "")
    if not len(like):
        return f"No row of ours ran as the paper's did, so none reproduces its numbers.{rest}"
    parts = [f"{r[('Model', '')]}, ours {r[('ACC', 'ours')]} against the paper's {r[('ACC', 'paper')]}"
             for _, r in like.iterrows()]
    return ("Like for like (trained as the paper's row was, at its input size), test accuracy in %: " + "; ".join(parts)
            + " (the paper's is its best of several trials on one random split)." + rest)


def drop_sentence(leak: pd.DataFrame, kind: str | None = None) -> str:
    """The validity chapter's key contrast in words, model by model: the range of the drops among the
    CNNs and among the baselines, each end named, never a mean over models this unlike.

    ``kind`` ("cnn" or "baseline") gives that group's statement alone, so a chapter can set the
    two side by side as separate sentences.
    """
    if "accuracy_drop" not in leak:
        present = [k for k in SPLIT_KINDS if f"{k}_accuracy" in leak]
        return (f"This study has only the {' and '.join(present) or 'no'} split, so the drop from the random to the "
                "scan split was not measured.")
    names = {"cnn": ("CNN", "CNNs"), "baseline": ("shortcut baseline", "shortcut baselines")}
    parts = []
    for group in ([kind] if kind else ("cnn", "baseline")):
        d = 100 * leak.loc[leak["kind"] == group, "accuracy_drop"].dropna()
        if len(d) == 1:
            parts.append(f"{d.iloc[0]:+.1f} points for the {names[group][0]} ({title(d.index[0])})")
        elif len(d):
            parts.append(f"from {d.min():+.1f} ({title(d.idxmin())}) to {d.max():+.1f} points ({title(d.idxmax())}) "
                         f"across the {len(d)} {names[group][1]}")
    if not parts:
        return f"No {names[kind][1]} ran on both splits."
    return ("Test accuracy on the random split minus test accuracy on the scan split was " + " and ".join(parts)
            + " (positive: the random split flatters; each model's drop, with both intervals, is in the table).")


def sweep_sentence(sweep: pd.DataFrame) -> str:
    """What the coarseness sweep measured, model by model, finest against coarsest level."""
    fine, coarse = sweep["groups"].max(), sweep["groups"].min()
    parts = []
    for name, rows in sweep.groupby("model", sort=False):
        a = rows.set_index("groups")["accuracy"]
        parts.append(f"{title(name)} {100 * a[fine]:.1f}% -> {100 * a[coarse]:.1f}%")
    return (f"From {fine} groups (near-duplicate components) to {coarse} clusters, test accuracy went: "
            + "; ".join(parts) + ".")


def leak_sentence(facts: pd.DataFrame | None) -> str:
    """How many random-split test slices have a near-duplicate in train, in words."""
    if facts is None or "random" not in facts.index:
        return "This study has no random split, so its near-duplicate share was not measured."
    r = facts.loc["random"]
    return (f"On the paper's random split, {100 * r['fraction']:.1f}% of the test slices "
            f"({int(r['with a near-duplicate in train'])} of {int(r['test images'])}) have a near-duplicate "
            f"(a slice within {int(r['threshold (bits)'])} bits of 256 by perceptual hash) among the training slices.")


PUBLISHED_PATIENTS = 210  # the dataset authors' later multiclass release of these scans (Soares et al.)


def scan_sentence(summary: dict | None) -> str:
    """What cutting the file-number sequence into scans found (``Scans.summary``), beside the
    patient count the dataset's authors published later."""
    if summary is None:
        return "These file names carry no numbers, so no scan order can be read from them."
    q = summary["size_quartiles"]
    per_class = ", ".join(f"{n} {label}" for label, n in summary["per_class"].items())
    return (f"Cut where consecutive slices stop resembling each other, the file numbers give {summary['segments']} "
            f"segments ({per_class}); a segment holds a median of {q[2]:.0f} slice{'' if q[2] == 1 else 's'} (quartiles {q[1]:.0f} to "
            f"{q[3]:.0f}, largest {q[4]:.0f}), and {summary['single_slice_segments']} are a single slice. For "
            f"comparison, the authors' later three-class release of the SARS-CoV-2 CT-scan dataset counts "
            f"{PUBLISHED_PATIENTS} patients (about 120 for the two classes used here); a patient cut into several "
            "segments can still fall on both sides of a scan split.")


def neighbour_sentence(facts: pd.DataFrame | None) -> str:
    """How many test slices of each split have a same-class slice one file number away in training."""
    column = "scan fraction within 1"
    if facts is None or column not in facts or facts[column].isna().all():
        return "This study's file names carry no scan order, so scan neighbours were not counted."
    parts = [f"{100 * f:.1f}% of the {kind} split's test slices" for kind, f in facts[column].dropna().items()]
    return ("A same-class slice one file number away (most likely the next slice of the same scan) is among the "
            "training slices for " + " and ".join(parts) + ".")


def fold_sentence(summary: pd.DataFrame) -> str:
    """Scan cross-validation (``folds.fold_summary``) in words: each model's mean and spread over folds."""
    if summary is None or not len(summary):
        return "Scan cross-validation did not run in this build."
    k = int(summary["folds"].iloc[0])
    parts = [f"{title(name)} {100 * r['accuracy_mean']:.1f}% ± {100 * r['accuracy_sd']:.1f} "
             f"({100 * r['accuracy_min']:.1f} to {100 * r['accuracy_max']:.1f})" for name, r in summary.iterrows()]
    return (f"Over {k} folds of whole scans (every slice tested once, by a model that saw no slice of its scan "
            f"segment), test accuracy, mean ± standard deviation over folds (lowest to highest fold), was: "
            + "; ".join(parts) + ".")


def masked_sentence(table: pd.DataFrame) -> str:
    """The lung-masked experiment in words: the CNN's and the best baseline's accuracy per view and split."""
    if table is None or not len(table):
        return "The lung-masked experiment did not run in this build."
    cnn, base = table[table["kind"] == "cnn"], table[table["kind"] == "baseline"]
    kinds = list(dict.fromkeys(table["split"]))
    where = " and ".join(f"the {k}" for k in kinds) + (" split" if len(kinds) == 1 else " splits")

    def on_each(rows: pd.DataFrame, view: str, ci: bool = True) -> str:
        cells = rows[rows["view"] == view].groupby("split", sort=False)
        return ", ".join(f"{100 * r['accuracy']:.1f}%" + (f" ({100 * r['accuracy_low']:.1f} to {100 * r['accuracy_high']:.1f})"
                                                          if ci else "") for r in (g.iloc[0] for _, g in cells))

    masked = base[base["view"] == "no_lungs"]
    best = [masked[masked["split"] == k].sort_values("accuracy").iloc[-1] for k in kinds if (masked["split"] == k).any()]
    name = title(cnn["model"].iloc[0])
    return (f"Test accuracy (95% CI) on {where}, in that order: the {name} reached {on_each(cnn, 'whole')} on whole "
            f"slices, {on_each(cnn, 'no_lungs')} with the lung fields blacked out and {on_each(cnn, 'lungs_only')} "
            f"with only the lungs left; with the lungs blacked out the best shortcut baseline reached "
            + ", ".join(f"{100 * r['accuracy']:.1f}% ({title(r['model'])})" for r in best)
            + ". Chance is about 50%.")


def external_sentence(table: pd.DataFrame | None, external: Path | None) -> str:
    if table is None or not len(table):
        # plain text: the book glues this sentence, and glued text is not parsed as Markdown
        return ("This build has no external test. The command 'covidlib data fetch --dataset ucsd-covid-ct' downloads "
                "UCSD-AI4H's COVID-CT (CT images cut from papers); any folder with COVID / non-COVID class folders "
                "works as well ('covidlib study --external DIR', or the COVIDLIB_EXTERNAL variable). The models are "
                "only evaluated on it.")
    cnn, base = table[table["kind"] == "cnn"], table[table["kind"] == "baseline"]
    drop = 100 * (cnn["internal_accuracy"] - cnn["external_accuracy"])
    models = "the CNN" if len(cnn) == 1 else f"the {len(cnn)} CNNs"
    return (f"On the external test ({int(table['n'].iloc[0])} images from {external.name}), {models} lost "
            f"{drop.mean():.1f} accuracy points on average (range {drop.min():.1f} to {drop.max():.1f}) against their "
            f"internal test split; the best shortcut baseline reached {100 * base['external_accuracy'].max():.1f}%.")


