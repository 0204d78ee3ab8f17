"""Do the maps explain the model? Model randomisation (Adebayo et al. 2018) and deletion / insertion (Petsiuk et al. 2018)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from covidlib import CovidlibError, runtime
from covidlib.data.lungs import lung_mask, lung_share
from covidlib.evaluate.stats import mean_ci
from covidlib.explain.gallery import reference_paths
from covidlib.explain.maps import _as_batch, _class, explain
from covidlib.models.contract import predict_covid
from covidlib.models.runs import RunFolder

# --- sanity and faithfulness ---------------------------------------------------------------


def randomisation_test(model, images, method: str = "gradcam", *, class_name: str = "covid", seed: int = 0,
                       layer: str | None = None, stages: tuple[int, ...] | None = None) -> list[dict]:
    """Cascading randomisation: re-draw weights from the top layer down, comparing maps each step.

    ``stages`` are the numbers of weighted layers re-drawn (from the top) at which maps are
    compared; by default after every layer. Each row has the mean Spearman rank correlation
    between the trained model's maps and the randomised model's, the per-image values, and
    the share of randomised maps that came out blank (constant). High correlation after the
    weights are gone means the method shows the image, not the model. The weights are
    re-drawn in place and restored afterwards, so the model's traced gradient function is
    reused (a second trace of a deep model costs tens of seconds on a CPU).
    """
    reference = explain(model, images, method, layer=layer, class_name=class_name)
    rng = np.random.default_rng(seed)
    weighted = [layer_ for layer_ in reversed(_flat_layers(model)) if layer_.get_weights()]
    wanted = set(stages or range(1, len(weighted) + 1))
    saved = model.get_weights()
    rows = []
    try:
        for k, layer_ in enumerate(weighted, start=1):
            layer_.set_weights([_redraw(w, rng) for w in layer_.get_weights()])
            if k not in wanted and k != len(weighted) or k > max(wanted):
                continue
            maps = explain(model, images, method, layer=layer, class_name=class_name)
            rho = [rank_similarity(a, b) for a, b in zip(reference, maps)]
            rows.append({"randomised_down_to": layer_.name, "layers_randomised": k, "spearman": float(np.mean(rho)),
                         "spearman_per_image": rho, "blank_maps": float(np.mean([np.ptp(m) == 0 for m in maps]))})
            if k >= max(wanted):
                break
    finally:
        model.set_weights(saved)
    return rows


def cascade_stages(model, fractions=(0.0, 0.5, 1.0)) -> tuple[int, ...]:
    """Layer counts for :func:`randomisation_test`: the top layer alone (fraction 0), then the given
    shares of the model's weighted layers, so deep and shallow models are compared at like depths."""
    n = sum(1 for layer_ in _flat_layers(model) if layer_.get_weights())
    return tuple(sorted({max(1, round(f * n)) for f in fractions}))


def rank_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman correlation of two maps; 0 when either is constant.

    Randomised weights often leave Grad-CAM all zero after its ReLU. A constant map carries
    no ranking, so it shares none with the trained map (scipy would say NaN, and a mean
    of NaNs hides the result).
    """
    from scipy.stats import spearmanr

    a, b = np.ravel(a), np.ravel(b)
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(spearmanr(a, b).statistic)


def _flat_layers(model) -> list:
    keras = runtime.keras()
    out = []
    for layer in model.layers:
        out += _flat_layers(layer) if isinstance(layer, keras.Model) else [layer]
    return out


def _redraw(w: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    scale = float(np.std(w)) or 0.05
    return rng.normal(0.0, scale, w.shape).astype(w.dtype)


FILLS = ("black", "blur")


def fill_image(image: np.ndarray, fill: str) -> np.ndarray:
    """What a deleted pixel becomes. ``black``: zero, as in Petsiuk et al.; ``blur``: the image under
    a wide Gaussian blur, so a deletion removes detail without drawing new sharp edges the model
    may react to (the concern behind ROAD, Rong et al. 2022)."""
    from scipy.ndimage import gaussian_filter

    if fill == "black":
        return np.zeros_like(image)
    if fill == "blur":
        sigma = max(image.shape[:2]) / 16
        return gaussian_filter(image, sigma=(sigma, sigma) + (0,) * (image.ndim - 2))
    raise CovidlibError(f"unknown fill {fill!r}; valid: {', '.join(FILLS)}")


def deletion_insertion(model, images, heats, *, class_name: str = "covid", steps: int = 20, seed: int = 0,
                       fill: str = "black", kinds: tuple[str, ...] = ("deletion", "insertion"),
                       chunk: int = 512) -> list[dict]:
    """Per image: area under P(class) as the most salient pixels are deleted (set to ``fill``) or
    inserted (into the ``fill`` image).

    A faithful map has a low deletion AUC and a high insertion AUC; the same numbers
    for a random order (each image its own, drawn from ``seed``) are returned alongside as the
    baseline. The perturbed copies of all the images go through the model together, at most
    ``chunk`` at a time (a ``predict`` per image cost 0.3-0.4 s of overhead each on a CPU).
    """
    if not kinds or set(kinds) - {"deletion", "insertion"}:
        raise CovidlibError(f"kinds must be deletion and/or insertion, got {kinds!r}")

    x, heats = _as_batch(images), np.asarray(heats).reshape(-1, *np.shape(heats)[-2:])
    rng = np.random.default_rng(seed)
    orders = [[np.argsort(-m.ravel(), kind="stable") for m in (heat, rng.random(heat.shape))] for heat in heats]
    per_image = 2 * (steps + 1) * len(kinds)
    group = max(1, chunk // per_image)
    p = np.concatenate([predict_covid(model, np.concatenate([_perturbed(img, o, fill, steps, kinds)
                                                              for img, o in zip(x[i:i + group], orders[i:i + group])]))
                        for i in range(0, len(x), group)])
    p = (p if _class(class_name) == 1 else 1 - p).reshape(len(x), 2, steps + 1, len(kinds))  # image, order, step, kind
    auc = np.trapezoid(p, dx=1.0 / steps, axis=2)
    return [{f"{kind}_auc_{name}": float(auc[n, i, j]) for i, name in enumerate(("map", "random"))
             for j, kind in enumerate(kinds)} for n in range(len(x))]


def _perturbed(image: np.ndarray, orders, fill: str, steps: int, kinds) -> np.ndarray:
    """Every step of every curve for one image: (order, step, kind) flattened, float32."""
    filled = fill_image(image, fill)
    batch = []
    for order in orders:
        for k in np.linspace(0, order.size, steps + 1).astype(int):
            mask = np.zeros(order.size, bool)
            mask[order[:k]] = True
            mask = mask.reshape(image.shape[:2])[..., None]
            batch += [np.where(mask, filled, image) if kind == "deletion" else np.where(mask, image, filled)
                      for kind in kinds]
    return np.stack(batch).astype(np.float32)


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
    run = Path(run)
    model = RunFolder(run).load_model()
    stages = cascade_stages(model)
    rows = []
    for label, class_name in ((1, "covid"), (0, "non-covid")):
        paths = reference_paths(run, n, label)
        if not paths:
            continue
        images, _ = RunFolder(run).slices(paths)
        x = np.stack(images)
        cascade = randomisation_test(model, x, method, class_name=class_name, stages=stages)
        rho = {f"spearman_{name}": row["spearman_per_image"]
               for name, row in zip(("top", "half", "all"), cascade)}
        heats = explain(model, x, method, class_name=class_name)
        curves = {fill: deletion_insertion(model, x, heats, class_name=class_name, steps=steps, fill=fill,
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


