"""Table 1 and the reader's tables: known answers on hand-made runs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from covidlib.evaluate import sentences
from covidlib.evaluate.stats import compare_runs
from covidlib.evaluate.tables import percent_ci, sanity_display, table1


def _runs(values: dict[str, list[float]]) -> pd.DataFrame:
    """One row per (arch, seed) with every metric equal to the given value and a +-1 point CI."""
    rows = []
    for arch, accs in values.items():
        for seed, v in enumerate(accs):
            row = {"arch": arch, "mode": "scratch", "weights": "none", "input_size": 32, "seed": seed}
            for m in ("accuracy", "precision", "recall", "f1", "auc", "macro_precision", "macro_recall", "macro_f1"):
                row[m], row[f"{m}_low"], row[f"{m}_high"] = v, v - 0.01, v + 0.01
            row["macro_f1"] = v - 0.001  # tells macro from COVID-positive apart
            rows.append(row)
    return pd.DataFrame(rows)


def test_percent_ci_reads_like_a_paper():
    assert percent_ci(0.958, 0.94, 0.976) == "95.8 (94.0-97.6)"
    assert percent_ci(float("nan"), 0, 0) == "–"


def test_table1_one_seed_has_five_metrics_with_cis_beside_the_paper():
    t = table1(_runs({"basic_cnn": [0.95], "alexnet": [0.90]}))
    assert list(t.columns.get_level_values(0).unique()) == ["Model", "Mode, weights, input", "Like the paper's row?",
                                                            "Seeds", "ACC", "PRE", "REC", "F1", "AUC"]
    basic = t.iloc[0]
    assert basic[("Model", "")] == "Basic CNN" and basic[("Mode, weights, input", "")] == "scratch, none, 32 px"
    assert basic[("ACC", "paper")] == "96.57" and basic[("ACC", "ours")] == "95.0 (94.0-96.0)"
    assert basic[("F1", "ours")] == "94.9 (94.0-96.0)"  # macro F1 by default
    assert table1(_runs({"basic_cnn": [0.95]}), "covid").iloc[0][("F1", "ours")] == "95.0 (94.0-96.0)"
    assert len(t) == 2  # no mean over rows that ran unlike the paper's
    assert t[("Like the paper's row?", "")].tolist() == ["yes", "no: 32 px, the paper's 227"]
    assert sentences.table1_sentence(t) == (
        "Like for like (trained as the paper's row was, at its input size), test accuracy in %: Basic CNN, ours "
        "95.0 (94.0-96.0) against the paper's 96.57 (the paper's is its best of several trials on one random split). "
        "The other 1 row ran unlike the paper's (each says why) and cannot be set against its numbers.")


def test_table1_with_seeds_gives_mean_sd_and_best():
    t = table1(_runs({"vgg16": [0.90, 0.92, 0.94]}))
    assert t.iloc[0][("Seeds", "")] == 3
    assert t.iloc[0][("ACC", "ours")] == "92.0 ± 2.0, best 94.0"
    assert t.iloc[0][("Like the paper's row?", "")] == "no: no ImageNet weights"
    assert sentences.table1_sentence(t).startswith("No row of ours ran as the paper's did")


@pytest.mark.parametrize("mode, weights, size, said", [
    ("frozen", "none", 96, "no: a frozen random backbone"), ("scratch", "none", 224, "no: no ImageNet weights"),
    ("finetune", "imagenet", 96, "no: 96 px, the paper's 224"), ("finetune", "imagenet", 224, "yes")])
def test_a_backbone_row_is_like_the_papers_only_with_imagenet_weights_at_its_size(mode, weights, size, said):
    from covidlib.evaluate.tables import like_for_like

    assert like_for_like("vgg16", mode, weights, size) == said


def test_table1_from_real_predictions_matches_sklearn():
    from sklearn import metrics as skm

    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 100)
    p = np.clip(y * 0.6 + rng.normal(0.2, 0.25, 200), 0, 1)
    preds = pd.DataFrame({"path": [f"{i}.png" for i in range(200)], "y": y, "p_covid": p})
    table, _ = compare_runs({}, {"run": preds}, n_resamples=200)  # predictions as a run folder holds them
    table = table.assign(arch="mobilenet", mode="frozen", weights="imagenet", input_size=224, seed=0, kind="cnn")
    row = table1(table).iloc[0]
    pred = p >= 0.5
    macro = skm.precision_score(y, pred, average="macro")
    assert row[("PRE", "ours")].startswith(f"{100 * macro:.1f} (")
    assert row[("AUC", "ours")].startswith(f"{100 * skm.roc_auc_score(y, p):.1f} (")
    assert row[("Mode, weights, input", "")] == "frozen, imagenet, 224 px" and row[("AUC", "paper")] == "97.99"


def test_unknown_averaging_is_refused():
    with pytest.raises(ValueError, match="averaging"):
        table1(_runs({"basic_cnn": [0.9]}), "weighted")


def _per_slice(n: int, deletion_gap: float, lung: float, rng) -> pd.DataFrame:
    """Hand-made sanity scores for ``n`` slices: a known mean deletion gap (+-0.05 alternating) and lung share."""
    from covidlib.explain.sanity import SANITY_SCORES

    df = pd.DataFrame({c: rng.uniform(0.2, 0.4, n) for c in SANITY_SCORES})
    df["path"], df["label"] = [f"s{i}.png" for i in range(n)], np.arange(n) % 2
    for fill in ("black", "blur"):
        df[f"deletion_{fill}_random"] = df[f"deletion_{fill}_map"] + deletion_gap + 0.05 * (-1) ** np.arange(n)
    df["lung_share"], df["lung_share_uniform"] = lung, 0.3
    return df


def test_sanity_aggregation_gives_means_with_cis_and_counts_passing_models():
    from covidlib.evaluate.sentences import sanity_sentence
    from covidlib.evaluate.stats import mean_ci
    from covidlib.explain.sanity import sanity_summary

    rng = np.random.default_rng(0)
    faithful, unfaithful = _per_slice(40, 0.2, 0.6, rng), _per_slice(40, 0.0, 0.3, rng)
    checks = {"alexnet": sanity_summary(faithful), "vgg16": sanity_summary(unfaithful)}
    a = checks["alexnet"]
    gap = faithful["deletion_black_random"] - faithful["deletion_black_map"]
    assert a["deletion_gap_black"] == pytest.approx(gap.mean())
    assert a["deletion_gap_black_low"] < gap.mean() < a["deletion_gap_black_high"] and a["deletion_gap_black_low"] > 0.15
    assert (a["slices"], a["covid_slices"], a["lung_gap"]) == (40, 20, pytest.approx(0.3))
    assert checks["vgg16"]["deletion_gap_black_low"] < 0 < checks["vgg16"]["deletion_gap_black_high"]
    sentence = sanity_sentence(checks)
    assert "checked on 40 test slices" in sentence
    assert "for 1 of 2 models when deleting to black and 1 of 2 when deleting to a blurred copy" in sentence
    assert "for 1 of 2 models the share was above uniform" in sentence
    assert "maps blank)" in sentence and "for activation heat maps" in sentence  # every randomised method
    shown = sanity_display(checks).set_index("Model")
    assert shown.loc["AlexNet", "Map mass in the lung fields %"] == "60 (60-60)"
    assert shown.loc["VGG16", "Slices"] == "40"
    assert "Grad-CAM maps blank, every layer re-initialised %" in shown.columns
    assert mean_ci([1.0, 1.0, 1.0]) == {"value": 1.0, "low": 1.0, "high": 1.0}
    wide, narrow = (mean_ci(rng.normal(0, 1, n)) for n in (20, 2000))
    assert narrow["high"] - narrow["low"] < (wide["high"] - wide["low"]) / 5  # shrinks like 1/sqrt(n)
