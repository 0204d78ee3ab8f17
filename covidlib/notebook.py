"""What the notebooks call, so that each notebook is prose, a few calls and a figure.

Nothing here is notebook-only logic: every function returns data or a plotly figure
built from the library's modules, and the CLI could call the same ones.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from covidlib import CovidlibError, plots, tables
from covidlib.evaluate import compare_runs, load_run, summarise, test_predictions
from covidlib.runs import RunFolder
from covidlib.runs import finished_runs as runs_in
from covidlib.tables import run_facts


def setup() -> dict:
    """Versions in use, and plotly's renderer: its own choice where a person runs the notebook.

    Plotly detects Colab, JupyterLab and VS Code by itself; only the kernels ``covidlib study``
    starts for the offline book ask for :data:`BOOK_RENDERER`: figures as HTML that call the
    ``Plotly`` the book loads once for all pages (``covidlib.book``), plus plotly's own mimetype
    for JupyterLab.
    """
    import plotly.io as pio

    from covidlib.runtime import versions
    from covidlib.study import BOOK_ENV

    if os.environ.get(BOOK_ENV):
        pio.renderers[BOOK_RENDERER] = _book_renderer()
        pio.renderers.default = f"plotly_mimetype+{BOOK_RENDERER}"
    return {**versions(), "plotly_renderer": pio.renderers.default}


BOOK_RENDERER = "covidlib_book"


def _book_renderer():
    """A figure as a div and a ``Plotly.newPlot`` call: no plotly.js, no MathJax from a CDN."""
    from plotly.io import to_html
    from plotly.io.base_renderers import HtmlRenderer

    class BookRenderer(HtmlRenderer):
        def activate(self):  # plotly.js comes from the book's _static, once for every page
            pass

        def to_mimebundle(self, fig_dict):
            return {"text/html": to_html(fig_dict, include_plotlyjs=False, include_mathjax=False, full_html=False,
                                         default_width="100%", default_height=525, validate=False)}

    return BookRenderer(include_plotlyjs=False)


def in_colab() -> bool:
    """True on Google Colab (its ``google.colab`` package is importable)."""
    try:
        return importlib.util.find_spec("google.colab") is not None
    except ModuleNotFoundError:  # no ``google`` package at all
        return False


def glue(name: str, value, display: bool = False) -> None:
    """myst-nb glue when it is installed (the book), a no-op otherwise (Colab).

    A plotly figure is glued as its mime bundle: IPython's formatter would call the figure's
    ``_ipython_display_``, which shows it at once and leaves the glue empty.
    """
    try:
        from myst_nb import glue as _glue
    except ImportError:
        return
    if hasattr(value, "_ipython_display_") and hasattr(value, "_repr_mimebundle_"):
        value = _MimeBundle(value._repr_mimebundle_())
    _glue(name, value, display=display)


class _MimeBundle:
    def __init__(self, bundle: dict):
        self.bundle = bundle

    def _repr_mimebundle_(self, include=None, exclude=None):
        return self.bundle


# --- one run -------------------------------------------------------------------------------


def run_summary(run: str | Path, n_resamples: int = 1000) -> tuple[pd.DataFrame, dict]:
    """Metrics with 95% CIs as a table, and the full summary (calibration, Youden)."""
    _, preds = load_run(run)
    test = preds[preds["split"] == "test"] if "split" in preds else preds
    val = preds[preds["split"] == "val"] if "split" in preds else None
    s = summarise(test, val=val, n_resamples=n_resamples)
    table = pd.DataFrame(s["metrics"]).T[["value", "low", "high"]]
    return table, s


def threshold_sentence(summary: dict) -> str:
    """Calibration and the validation-chosen threshold, in words."""
    text = f"Expected calibration error on test: {summary['ece']:.3f}."
    youden = summary.get("youden")
    if youden:
        m = youden["metrics"]
        text += (f" At the threshold chosen on the validation slices (Youden's J, {youden['threshold']:.2f} instead of "
                 f"0.50), test sensitivity is {100 * m['recall']:.1f}% and specificity {100 * m['specificity']:.1f}%.")
    return text


def run_figures(run: str | Path) -> dict:
    run = Path(run)
    record, _ = load_run(run)
    title = record["config"]["arch"]
    test = test_predictions(run)
    _, s = run_summary(run, n_resamples=200)
    return {
        "learning_curves": plots.learning_curves(RunFolder(run).history(), f"{title}: learning curves"),
        "confusion": plots.confusion_matrix(s["confusion"], f"{title}: confusion matrix"),
        "roc_pr": plots.roc_pr({title: test}, f"{title}: ROC and precision-recall"),
    }


def _display_images(run: Path, paths: list[str], size: int | None = None) -> tuple[list[np.ndarray], int]:
    from covidlib.data import read_image

    record, _ = load_run(run)
    root = Path(record["data"]["root"])
    size = size or int(record["config"]["input_size"])
    return [read_image(root / p, size, 1, record["config"].get("resize", "stretch")) for p in paths], size


def prediction_grid(run: str | Path, n: int = 12, seed: int = 0, display_size: int = 128):
    """Figures 13-15: test slices captioned 'predicted (true)', green right, red wrong.

    Shows every misclassified slice first (up to ``n``), then random correct ones.
    """
    run = Path(run)
    test = test_predictions(run)
    wrong = test[(test["p_covid"] >= 0.5) != (test["y"] == 1)]
    right = test.drop(wrong.index).sample(frac=1, random_state=seed)
    pick = pd.concat([wrong.head(n // 2), right]).head(n)
    images, _ = _display_images(run, list(pick["path"]), display_size)
    return plots.prediction_grid(images, pick["y"], pick["p_covid"], title=f"{run.name}: test predictions")


def example_paths(run: str | Path, n: int = 3, label: int = 1) -> list[str]:
    """The ``n`` test slices of class ``label`` the model is most sure about (clearest to explain)."""
    test = test_predictions(run)
    cls = test[test["y"] == label].sort_values("p_covid", ascending=label == 0)
    return list(cls["path"].head(n))


GALLERY_METHODS = ("cam", "gradcam", "gradcam++", "saliency")


def reference_paths(run: str | Path, n: int = 3, label: int = 1) -> list[str]:
    """``n`` test slices of class ``label``, spread over the sorted test list.

    They depend on the split only, not on the model, so every model on one split is
    explained on the same slices, and the explainability chapter can reuse the maps
    each training notebook already made.
    """
    test = test_predictions(run)
    paths = sorted(test.loc[test["y"] == label, "path"])
    if not paths:
        return []
    picks = np.unique(np.linspace(0, len(paths) - 1, min(n, len(paths))).round().astype(int))
    return [paths[i] for i in picks]


def cam_gallery(run: str | Path, paths: list[str] | None = None, methods=GALLERY_METHODS, class_name: str = "covid"):
    """Overlays for a few test slices and several methods (rows: images, columns: methods).

    The tiles are kept in the run folder (``explain/gallery-KEY.npz``), keyed by slices,
    methods and class: a finished run's model never changes, and tracing the gradient
    functions of a deep model costs tens of seconds on a CPU.
    """
    from covidlib.explain import MAPS_VERSION
    from covidlib.paths import atomic_path, cache_key

    run = Path(run)
    paths = paths or reference_paths(run)
    if not paths:
        raise CovidlibError(f"{run}: no test slices of the class to explain; pass paths=[...]")
    key = cache_key("gallery", MAPS_VERSION, *paths, "|", *methods, class_name)
    stored = RunFolder(run).explain_dir / f"{key}.npz"
    if stored.exists():
        with np.load(stored) as z:
            tiles, captions, cols = list(z["tiles"]), [str(c) for c in z["captions"]], int(z["cols"])
    else:
        tiles, captions, cols = _gallery_tiles(run, paths, methods, class_name)
        with atomic_path(stored, suffix=".npz") as tmp:
            np.savez_compressed(tmp, tiles=np.stack(tiles), captions=np.array(captions), cols=cols)
    return plots.image_grid(tiles, captions, cols=cols, title=f"{run.name}: where the model looks")


def _gallery_tiles(run: Path, paths: list[str], methods, class_name: str) -> tuple[list[np.ndarray], list[str], int]:
    from covidlib import explain as X

    model = RunFolder(run).load_model()
    methods = [m for m in methods if m != "cam" or _has_gap(model)]
    images, _ = _display_images(run, paths)
    tiles, captions = [], []
    for path, img in zip(paths, images):
        tiles.append(np.repeat(np.clip(img[..., :1], 0, 255).astype(np.uint8), 3, axis=-1))  # RGB, so tiles stack
        captions.append(Path(path).name)
        for method in methods:
            tiles.append(X.overlay(img, X.explain(model, img, method, class_name=class_name)[0]))
            captions.append(method)
    return tiles, captions, len(methods) + 1


def _has_gap(model) -> bool:
    from covidlib.models import pooling

    return pooling(model) is not None


def layer_maps(run: str | Path, path: str | None = None, max_layers: int = 6, channels: int = 16):
    """Figures 7-8 and 10-11 for one positive slice: feature grids and heat maps per layer."""
    from covidlib import explain as X

    run = Path(run)
    model = RunFolder(run).load_model()
    path = path or example_paths(run, 1)[0]
    (img,), size = _display_images(run, [path])
    layers = X.feature_map_layers(model)
    if len(layers) > max_layers:  # spread the shown layers from the first to the last
        layers = [layers[i] for i in np.linspace(0, len(layers) - 1, max_layers).round().astype(int)]
    acts = X.activations(model, img, layers)
    grids = plots.image_grid([X.feature_grid(a, channels) for a in acts.values()], list(acts), cols=3,
                             title=f"{run.name}: feature maps per layer ({Path(path).name})")
    heats = plots.image_grid([X.overlay(img, X.heatmap(a, (size, size))) for a in acts.values()], list(acts),
                             cols=3, title=f"{run.name}: per-layer heat maps")
    return grids, heats


# Deleting to black, the paper-era check, both ways; to a blurred copy (ROAD's concern), deletion only:
# every curve point is a forward pass, and the frozen backbones make those the check's main cost.
SANITY_CURVES = {"black": ("deletion", "insertion"), "blur": ("deletion",)}
SANITY_SCORES = ("spearman_top", "spearman_half", "spearman_all", "lung_share", "lung_share_uniform",
                 *(f"{kind}_{fill}_{order}" for fill, kinds in SANITY_CURVES.items() for kind in kinds
                   for order in ("map", "random")))


def sanity(run: str | Path, n: int = 20, method: str = "gradcam", steps: int = 6) -> pd.DataFrame:
    """Sanity scores of one model's maps, one row per test slice: ``n`` COVID and ``n`` non-COVID slices
    chosen by the split (not by how sure the model is), each explained for its own class.

    Columns: rank correlation with the trained map after re-drawing the top layer, half and all
    of the weighted layers (``spearman_*``); deletion / insertion AUCs in the map's and a random
    order, deleting to black (both ways) and to a blurred copy (``deletion_black_map``, ...); the map's share
    inside the lung fields and a uniform map's.
    """
    from covidlib import explain as X
    from covidlib.lungs import lung_mask, lung_share

    run = Path(run)
    model = RunFolder(run).load_model()
    stages = X.cascade_stages(model)
    rows = []
    for label, class_name in ((1, "covid"), (0, "non-covid")):
        paths = reference_paths(run, n, label)
        if not paths:
            continue
        images, _ = _display_images(run, paths)
        x = np.stack(images)
        cascade = X.randomisation_test(model, x, method, class_name=class_name, stages=stages)
        rho = {f"spearman_{name}": row["spearman_per_image"]
               for name, row in zip(("top", "half", "all"), cascade)}
        heats = X.explain(model, x, method, class_name=class_name)
        curves = {fill: X.deletion_insertion(model, x, heats, class_name=class_name, steps=steps, fill=fill,
                                             kinds=kinds) for fill, kinds in SANITY_CURVES.items()}
        for i, (path, img, heat) in enumerate(zip(paths, images, heats)):
            row = {"path": path, "label": label, **{k: v[i] for k, v in rho.items()},
                   **lung_share(heat, lung_mask(img))}
            for fill, scores in curves.items():
                row.update({k.replace("_auc_", f"_{fill}_"): v for k, v in scores[i].items()})
            rows.append(row)
    return pd.DataFrame(rows)


def sanity_summary(per_slice: pd.DataFrame, n_resamples: int = 1000) -> dict[str, float]:
    """Mean and 95% bootstrap CI over slices of every sanity score, and of the paired gaps that
    decide each check: random-order minus map-order deletion AUC (above 0: the map finds what
    matters) and map-order minus random-order insertion AUC, and the lung share minus a uniform map's."""
    from covidlib.evaluate import mean_ci

    df = per_slice.copy()
    for fill, kinds in SANITY_CURVES.items():
        df[f"deletion_gap_{fill}"] = df[f"deletion_{fill}_random"] - df[f"deletion_{fill}_map"]
        if "insertion" in kinds:
            df[f"insertion_gap_{fill}"] = df[f"insertion_{fill}_map"] - df[f"insertion_{fill}_random"]
    df["lung_gap"] = df["lung_share"] - df["lung_share_uniform"]
    out: dict[str, float] = {"slices": len(df), "covid_slices": int((df["label"] == 1).sum())}
    for column in [c for c in df.columns if c not in ("path", "label")]:
        ci = mean_ci(df[column], n_resamples=n_resamples)
        out.update({column: ci["value"], f"{column}_low": ci["low"], f"{column}_high": ci["high"]})
    return out


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
            f"order, with the 95% CI of the gap above zero, for {_above_zero(df, 'deletion_gap_black')} of {n} models "
            f"when deleting to black and {_above_zero(df, 'deletion_gap_blur')} of {n} when deleting to a blurred copy. "
            f"After the top layer's weights were re-drawn, the maps' mean rank correlation with the trained maps was "
            f"{_span(df['spearman_top'], '.2f', ' to ')} across models, and {_span(df['spearman_all'], '.2f', ' to ')} "
            f"after every layer was (near 1: the map barely depends on what the model learned). The maps put "
            f"{_span(100 * df['lung_share'], '.0f')}% of their mass inside the lung fields, where a uniform map puts "
            f"{100 * df['lung_share_uniform'].mean():.0f}%; for {_above_zero(df, 'lung_gap')} of {n} models the share "
            f"was above uniform with the CI above zero.")


# --- a study (several runs on one split) ---------------------------------------------------


def finished_runs(study_dir: str | Path, split_kind: str | None = None, *, seeds: bool = False) -> dict[str, Path]:
    """Run name -> run folder for every finished run of a study, in the preset's order.

    A study with ``--seeds N`` has one main run per architecture and split (``ARCH-SPLIT``) and
    its extra seeds (``ARCH-SPLIT-seedN``); only Table 1 reads those (``seeds=True``), so every
    other figure, test and gallery compares one run per architecture.
    """
    from covidlib.study import SEED_SUFFIX

    out = {}
    for run in runs_in(Path(study_dir) / "runs"):
        if split_kind and run.record().get("split", {}).get("kind") != split_kind:
            continue
        if not seeds and SEED_SUFFIX in run.name:
            continue
        out[run.name] = run.path
    return out


def study_status(study_dir: str | Path) -> pd.DataFrame:
    from covidlib.study import read_status

    return pd.DataFrame(read_status(study_dir)).T


def comparison(study_dir: str | Path, split_kind: str = "random", n_resamples: int = 1000):
    """Our table (CNNs and shortcut baselines on one test split) and the pairwise tests."""
    from covidlib.baselines import baselines_for_run

    runs = {k.removesuffix(f"-{split_kind}"): v for k, v in finished_runs(study_dir, split_kind).items()}
    if not runs:
        return pd.DataFrame(), pd.DataFrame()
    base = baselines_for_run(next(iter(runs.values())))
    return compare_runs(runs, base, n_resamples=n_resamples)


def table1(study_dir: str | Path, split_kind: str, averaging: str = "macro", n_resamples: int = 1000) -> pd.DataFrame:
    """The paper's Table 1 beside our CNNs, every seed of each (see :mod:`covidlib.tables`)."""
    runs = finished_runs(study_dir, split_kind, seeds=True)
    if not runs:
        return pd.DataFrame()
    table, _ = compare_runs(runs, n_resamples=n_resamples, pairs=False)
    return tables.table1(table.join(run_facts({name: RunFolder(path).record() for name, path in runs.items()})),
                         averaging)


def leakage_table(study_dir: str | Path, n_resamples: int = 1000) -> pd.DataFrame:
    """Each model's test accuracy and AUC on the random and on the grouped split, and the drop."""
    rows = {}
    for kind in ("random", "grouped"):
        table, _ = comparison(study_dir, kind, n_resamples=n_resamples)
        for name, r in table.iterrows():
            rows.setdefault(name, {"kind": r["kind"]})
            for m in ("accuracy", "auc"):
                rows[name][f"{kind}_{m}"] = r[m]
                rows[name][f"{kind}_{m}_low"], rows[name][f"{kind}_{m}_high"] = r[f"{m}_low"], r[f"{m}_high"]
    df = pd.DataFrame.from_dict(rows, orient="index")
    if {"random_accuracy", "grouped_accuracy"} <= set(df.columns):
        df["accuracy_drop"] = df["random_accuracy"] - df["grouped_accuracy"]
    return df


def main_split(study_dir: str | Path) -> str:
    """The split a report shows: the paper's random split, else the grouped one (a study may have either)."""
    for kind in ("random", "grouped"):
        if finished_runs(study_dir, kind):
            return kind
    raise CovidlibError(f"{study_dir} holds no finished runs")


def drop_sentence(leak: pd.DataFrame, kind: str | None = None) -> str:
    """The validity chapter's key contrast in words: the CNNs' and the baselines' mean drop, apart.

    ``kind`` ("cnn" or "baseline") gives that group's statement alone, so a chapter can set the
    two side by side as separate sentences.
    """
    if "accuracy_drop" not in leak:
        present = [k for k in ("random", "grouped") if f"{k}_accuracy" in leak]
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
    from covidlib.tables import title

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


EXTERNAL_ENV = "COVIDLIB_EXTERNAL"


def external_folder(external: str | Path | None) -> Path | None:
    """The external test folder: ``external`` if given, else ``$COVIDLIB_EXTERNAL``, else none."""
    chosen = external or os.environ.get(EXTERNAL_ENV)
    return Path(chosen).expanduser().resolve() if chosen else None


def external_table(study_dir: str | Path, external: str | Path, split_kind: str,
                   n_resamples: int = 1000) -> pd.DataFrame:
    """Every model of one split and the shortcut baselines, trained as they were, on another dataset.

    Evaluation only: nothing is fitted, tuned or chosen on the external images; the baselines are
    refitted exactly as on the study's split and only predict them. Internal test accuracy beside
    the external one, with the sensitivity and specificity that moved.
    """
    from covidlib.baselines import baselines_for_run
    from covidlib.data import load_dataset
    from covidlib.evaluate import bootstrap_ci, check_external, predict_folder

    ext = load_dataset(external)
    runs = {k.removesuffix(f"-{split_kind}"): v for k, v in finished_runs(study_dir, split_kind).items()}
    first = next(iter(runs.values()))
    check_external(first, ext)
    preds = {name: predict_folder(run, ext) for name, run in runs.items()}
    internal = {name: test_predictions(run) for name, run in runs.items()}
    internal.update(baselines_for_run(first))
    preds.update(baselines_for_run(first, external=ext))
    rows = {}
    for name, df in preds.items():
        e = bootstrap_ci(df["y"], df["p_covid"], n_resamples=n_resamples)
        i = bootstrap_ci(internal[name]["y"], internal[name]["p_covid"], n_resamples=n_resamples)
        rows[name] = {"kind": "cnn" if name in runs else "baseline", "n": len(df)}
        for m in ("accuracy", "recall", "specificity", "auc"):
            rows[name][f"internal_{m}"] = i[m]["value"]
            rows[name][f"external_{m}"] = e[m]["value"]
            rows[name][f"external_{m}_low"], rows[name][f"external_{m}_high"] = e[m]["low"], e[m]["high"]
    return pd.DataFrame.from_dict(rows, orient="index")


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


def study_data_root(study_dir: str | Path) -> Path:
    """The dataset a study's runs were trained on (from the first run's record)."""
    run = next(iter(finished_runs(study_dir).values()))
    return Path(RunFolder(run).record()["data"]["root"])


def distributions_figure(dataset_root: str | Path, external: str | Path):
    """Image size and mean grey level of the training data and the external data, side by side."""
    import plotly.express as px

    from covidlib.data import decoded, load_dataset

    frames = []
    for name, root in (("training data", dataset_root), ("external", external)):
        ds = load_dataset(root)
        m = ds.manifest[["width", "height", "label"]].copy()
        m["mean grey level"] = np.asarray(decoded(ds, 64).images, np.float32).mean(axis=(1, 2, 3))
        m["dataset"] = name
        frames.append(m)
    df = pd.concat(frames, ignore_index=True)
    fig = px.scatter(df, x="width", y="mean grey level", color="dataset", symbol="label", opacity=0.5,
                     title="Image width and mean grey level: training data and external data")
    fig.update_layout(height=420)
    return fig


def calibration_figure(study_dir: str | Path, split_kind: str = "random"):
    runs = {k: test_predictions(v) for k, v in finished_runs(study_dir, split_kind).items()}
    return plots.reliability(runs, title="Reliability (test split)")


def explorer(study_dir: str | Path, n_images: int = 8):
    """ipywidgets: model, image, method, layer, class and opacity -> an overlay, live in Jupyter.

    In the static book only the state saved at execution shows; the gallery figures are
    the static fallback.
    """
    import ipywidgets as w

    from covidlib import explain as X

    runs = finished_runs(study_dir)
    if not runs:
        return w.HTML("no finished runs in this study")
    models: dict[str, object] = {}
    first = next(iter(runs.values()))
    paths = example_paths(first, n_images // 2, 1) + example_paths(first, n_images // 2, 0)
    model_w = w.Dropdown(options=list(runs), description="model")
    image_w = w.Dropdown(options=[(Path(p).name, p) for p in paths], description="image")
    method_w = w.Dropdown(options=list(X.MAP_METHODS), value="gradcam", description="method")
    layer_w = w.Dropdown(options=["(auto)"], description="layer")
    class_w = w.ToggleButtons(options=list(X.CLASSES), description="class")
    alpha_w = w.FloatSlider(value=0.45, min=0, max=1, step=0.05, description="opacity")
    # An Image widget, not an Output widget: nbclient (papermill) can hang on an Output
    # widget's display/clear_output messages when no browser is attached (seen in CI).
    picture = w.Image(format="png", width=384)
    message = w.HTML()

    def model_for(name):
        if name not in models:
            models[name] = RunFolder(runs[name]).load_model()
        return models[name]

    def on_model(*_):
        layer_w.options = ["(auto)", *X.spatial_layers(model_for(model_w.value))[-12:]]

    def draw(*_):
        import cv2

        model = model_for(model_w.value)
        (img,), _ = _display_images(runs[model_w.value], [image_w.value])
        layer = None if layer_w.value == "(auto)" else layer_w.value
        try:
            heat = X.explain(model, img, method_w.value, layer=layer, class_name=class_w.value)[0]
        except Exception as exc:  # shown in the widget, not raised into the notebook
            message.value = f"cannot draw: {exc}"
            return
        rgb = X.overlay(img, heat, alpha_w.value)
        picture.value = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()
        message.value = f"{model_w.value}: {method_w.value} for class {class_w.value}"

    model_w.observe(on_model, "value")
    on_model()
    for widget in (model_w, image_w, method_w, layer_w, class_w, alpha_w):
        widget.observe(draw, "value")
    draw()
    return w.VBox([w.HBox([model_w, image_w, method_w]), w.HBox([layer_w, class_w, alpha_w]), message, picture])


# --- the dataset tour ----------------------------------------------------------------------


def colab_defaults(preset: str, data: str | None) -> tuple[str, str | None]:
    """On Colab: the full dataset through kagglehub, and the paper preset on a GPU runtime.

    Every notebook calls this, so all five agree. An explicit ``data`` or ``$COVIDLIB_DATA``
    (a dataset on a mounted Drive, say) wins over the download.
    """
    if not in_colab():
        return preset, data
    from covidlib.data import fetch
    from covidlib.runtime import gpus

    preset = "paper" if gpus() and preset == "smoke" else preset
    data = data or os.environ.get("COVIDLIB_DATA") or str(fetch())
    print(f"Colab: preset {preset} ({'GPU' if gpus() else 'no GPU'}), data {data}")
    return preset, data


STUDY_ENV = "COVIDLIB_STUDY"


def _studies_near_here() -> list[Path]:
    """Study folders under ``studies/`` of the clone and of the working folder (and its parent,
    since JupyterLab starts a kernel in ``notebooks/``), newest first."""
    from covidlib.paths import repository_root

    bases = [b for b in (repository_root(), Path.cwd(), Path.cwd().parent) if b is not None]
    found = {study.resolve() for b in bases for study in (b / "studies").glob("*") if runs_in(study / "runs")}
    return sorted(found, key=lambda p: (p / "runs").stat().st_mtime, reverse=True)


def find_study(study_dir: str | Path | None = None, *, preset: str = "smoke", data: str | None = None,
               train_if_missing: bool = True) -> Path | None:
    """The study a report notebook shows.

    ``study_dir`` if given; else ``$COVIDLIB_STUDY``; else the newest study beside the clone or the
    working folder. With none, a small one (two models, both splits) is trained into
    ``studies/notebook`` here, so a notebook opened alone still runs; ``train_if_missing=False``
    returns None instead.
    """
    explicit = study_dir or os.environ.get(STUDY_ENV)
    if explicit:
        path = Path(explicit).expanduser().resolve()
        if not path.is_dir() or (train_if_missing and not finished_runs(path)):
            raise CovidlibError(f"{path} holds no finished runs; run `covidlib study --out {path}` first")
        return path
    near = _studies_near_here()
    if near:
        print(f"showing the study in {near[0]}")
        return near[0]
    if not train_if_missing:
        return None
    from covidlib.study import QUICK_ARCHS, quick_study

    out = Path.cwd() / "studies" / "notebook"
    print(f"no study found: training a small one ({', '.join(QUICK_ARCHS)}, preset {preset}) into {out}; "
          "`covidlib study` trains all nine")
    return quick_study(out, preset=preset, data=data)


def size_figure(dataset):
    import plotly.express as px

    fig = px.scatter(dataset.manifest, x="width", y="height", color="label", opacity=0.6,
                     title="Image size by class (each point is one slice)")
    fig.update_layout(height=420)
    return fig


def sample_grid(dataset, per_class: int = 4, seed: int = 0, size: int = 160):
    from covidlib.data import read_image

    m = dataset.manifest
    pick = pd.concat([g.sample(per_class, random_state=seed) for _, g in m.groupby("label")])
    images = [read_image(dataset.root / p, size) for p in pick["path"]]
    captions = [f"{lab} ({w}x{h})" for lab, w, h in zip(pick["label"], pick["width"], pick["height"])]
    return plots.image_grid(images, captions, cols=per_class, title="Sample slices")


def near_duplicate_examples(dataset, n: int = 4, size: int = 160):
    """The closest pairs of distinct slices by perceptual hash: near-copies from one scan."""
    from covidlib.data import read_image
    from covidlib.splits import hamming_blocks, phashes

    h = phashes(dataset)
    d = np.concatenate([block for _, block in hamming_blocks(h, h)])
    np.fill_diagonal(d, 10**6)
    d[np.tril_indices(len(h))] = 10**6
    flat = np.argsort(d, axis=None)
    pairs, used = [], set()
    for idx in flat:
        i, j = np.unravel_index(idx, d.shape)
        if d[i, j] == 0 or i in used or j in used:  # exact copies are listed in SOURCE.md; show near ones
            continue
        pairs.append((i, j, int(d[i, j])))
        used |= {i, j}
        if len(pairs) == n:
            break
    paths = dataset.manifest["path"]
    images, captions = [], []
    for i, j, dist in pairs:
        for k in (i, j):
            images.append(read_image(dataset.root / paths[k], size))
            captions.append(f"{Path(paths[k]).name} (d={dist})")
    return plots.image_grid(images, captions, cols=4, title="Near-duplicate pairs (phash distance in bits of 256)")


def split_facts(study_dir: str | Path) -> pd.DataFrame:
    rows = {}
    for path in sorted(Path(study_dir).glob("split-*.json")):
        info = json.loads(path.read_text())
        nd = info["near_duplicates"]
        rows[info["kind"]] = {"test images": nd["test_images"],
                              "with a near-duplicate in train": nd["with_train_near_duplicate"],
                              "fraction": nd["fraction"], "threshold (bits)": nd["threshold"]}
    return pd.DataFrame.from_dict(rows, orient="index")
