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


def drop_sentence(leak: pd.DataFrame, kind: str | None = None) -> str:
    """The validity chapter's key contrast in words: the CNNs' and the baselines' mean drop, apart.

    ``kind`` ("cnn" or "baseline") gives that group's statement alone, so a chapter can set the
    two side by side as separate sentences.
    """
    if "accuracy_drop" not in leak:
        present = [k for k in SPLIT_KINDS if f"{k}_accuracy" in leak]
        return (f"This study has only the {' and '.join(present) or 'no'} split, so the drop from the random to the "
                "grouped split was not measured.")
    names = {"cnn": ("CNN", "CNNs"), "baseline": ("shortcut baseline", "shortcut baselines")}
    parts = []
    for group in ([kind] if kind else ("cnn", "baseline")):
        d = 100 * leak.loc[leak["kind"] == group, "accuracy_drop"].dropna()
        if len(d):
            each = f"the {names[group][0]}" if len(d) == 1 else f"the {len(d)} {names[group][1]}"
            spread = f", from {d.min():+.1f} to {d.max():+.1f}" if len(d) > 1 else ""
            parts.append(f"{d.mean():+.1f} points for {each}{spread if kind else ''}")
    if not parts:
        return f"No {names[kind][1]} ran on both splits."
    return ("Test accuracy on the random split minus test accuracy on the grouped split was, on average, "
            + " and ".join(parts) + " (positive: the random split flatters).")


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


