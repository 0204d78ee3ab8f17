"""Do the maps explain the model? Model randomisation (Adebayo et al. 2018) and deletion / insertion (Petsiuk et al. 2018)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy.ndimage import gaussian_filter
from scipy.stats import spearmanr

from covidlib import CovidlibError, runtime
from covidlib.data.lungs import lung_mask, lung_share
from covidlib.evaluate.stats import mean_ci
from covidlib.explain.gallery import reference_paths
from covidlib.explain.layers import heatmap
from covidlib.explain.maps import _MAPS, _as_batch, _class, _Forward, _upsample, find_target_layer
from covidlib.models.contract import predict_covid
from covidlib.models.runs import RunFolder

# --- sanity and faithfulness ---------------------------------------------------------------


SANITY_METHODS = ("gradcam", "saliency", "heatmap")  # heatmap: the target layer's activations (explain.layers)


def randomisation_test(model, images, method: str = "gradcam", *, class_name: str = "covid", seed: int = 0,
                       layer: str | None = None, stages: tuple[int, ...] | None = None,
                       methods: tuple[str, ...] | None = None, references: dict | None = None) -> list[dict]:
    """Cascading randomisation: re-initialise the layers from the top down, comparing maps each step.
    ``stages`` are the numbers of weighted layers re-initialised (from the top) at which maps are
    compared; by default after every layer. ``methods`` (default ``(method,)``) are compared at every
    stage, one row per stage and method: the mean Spearman rank correlation between the trained
    model's maps and the randomised model's over the pairs where neither map is blank, the per-image
    values (NaN for a blank pair), and the shares of blank maps. High correlation after the weights
    are gone means the method shows the image, not the model. Each layer is re-initialised with its
    own initialisers (normalisation statistics reset), as a freshly built model would be, so the
    randomised model is one that could exist. The weights are assigned in place and restored
    afterwards, so the model's traced gradient function is reused (a second trace of a deep model
    costs tens of seconds on a CPU). ``references`` holds trained maps the caller computed already.
    """
    methods = tuple(methods or (method,))
    known = references or {}  # the trained model's maps where the caller has them already
    reference = {m: known[m] if m in known else maps_and_grid(model, images, m, layer=layer, class_name=class_name)[0]
                 for m in methods}
    rng = np.random.default_rng(seed)
    weighted = [layer_ for layer_ in reversed(_flat_layers(model)) if layer_.get_weights()]
    wanted = set(stages or range(1, len(weighted) + 1))
    saved = model.get_weights()
    rows = []
    try:
        for k, layer_ in enumerate(weighted, start=1):
            layer_.set_weights(_reinitialised(layer_, rng))
            if k not in wanted and k != len(weighted) or k > max(wanted):
                continue
            for m in methods:
                maps = maps_and_grid(model, images, m, layer=layer, class_name=class_name)[0]
                rows.append({"method": m, "randomised_down_to": layer_.name, "layers_randomised": k,
                             **compare_maps(reference[m], maps)})
            if k >= max(wanted):
                break
    finally:
        model.set_weights(saved)
    return rows


def compare_maps(reference: np.ndarray, maps: np.ndarray) -> dict:
    """Spearman per image pair and their mean over the pairs where neither map is blank; a blank map
    has no ranking to share, so it is counted (``blank_maps``: the randomised maps, ``blank_reference``:
    the trained ones), never scored as a correlation of 0."""
    rho = [rank_similarity(a, b) for a, b in zip(reference, maps)]
    scored = [r for r in rho if np.isfinite(r)]
    blank = [float(is_blank(m)) for m in maps]
    return {"spearman": float(np.mean(scored)) if scored else float("nan"), "spearman_per_image": rho,
            "blank_maps": float(np.mean(blank)), "blank_per_image": blank,
            "blank_reference": float(np.mean([is_blank(m) for m in reference]))}


def cascade_stages(model, fractions=(0.0, 0.5, 1.0), distinct: bool = True) -> tuple[int, ...]:
    """Layer counts for :func:`randomisation_test`: the top layer alone (fraction 0), then the given
    shares of the model's weighted layers, so deep and shallow models are compared at like depths.
    ``distinct=False`` gives one count per fraction, in their order (a shallow model's may repeat)."""
    n = sum(1 for layer_ in _flat_layers(model) if layer_.get_weights())
    counts = [max(1, round(f * n)) for f in fractions]
    return tuple(sorted(set(counts))) if distinct else tuple(counts)


def is_blank(m: np.ndarray) -> bool:
    """A map with no ranking: constant (all zero after Grad-CAM's ReLU, say) or not finite anywhere."""
    m = np.asarray(m)
    return bool(not np.isfinite(m).all() or np.ptp(m) == 0)


def rank_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman correlation of two maps; NaN when either is blank (:func:`is_blank`).
    Randomised weights can leave Grad-CAM all zero after its ReLU. A constant map carries no
    ranking, so no correlation exists: NaN says so, and the callers count such pairs apart
    instead of averaging a made-up 0 into the result.
    """
    if is_blank(a) or is_blank(b):
        return float("nan")
    return float(spearmanr(np.ravel(a), np.ravel(b)).statistic)


def _flat_layers(model) -> list:
    keras = runtime.keras()
    out = []
    for layer in model.layers:
        out += _flat_layers(layer) if isinstance(layer, keras.Model) else [layer]
    return out


# Keras names a depthwise kernel's variable "kernel" but its initialiser depthwise_initializer.
_INITIALISER_ALIASES = {"kernel": ("depthwise_initializer",), "depthwise_kernel": ("depthwise_initializer",),
                        "pointwise_kernel": ("pointwise_initializer",)}
# An adapted Normalization layer's statistics have no initialiser: reset to the identity.
_RESET = {"mean": 0.0, "variance": 1.0}


def _reinitialised(layer, rng: np.random.Generator) -> list[np.ndarray]:
    """Fresh values for every weight of ``layer``, drawn by the layer's own initialisers (seeded from
    ``rng``): kernels as when built, BatchNormalization's gamma 1, beta 0, moving mean 0 and moving
    variance 1. Drawing everything from one normal distribution made moving variances negative, and
    the maps NaN."""
    out = []
    for variable in layer.weights:
        name = variable.name.split("/")[-1]
        init = next((getattr(layer, a) for a in (f"{name}_initializer", *_INITIALISER_ALIASES.get(name, ()))
                     if getattr(layer, a, None) is not None), None)
        if init is not None:
            value = _seeded(init, int(rng.integers(2**31)))(shape=tuple(variable.shape), dtype=variable.dtype)
        elif name in _RESET:
            value = np.full(tuple(variable.shape), _RESET[name])
        elif name == "count":
            value = variable.numpy()
        else:
            raise CovidlibError(f"layer {layer.name}: no initialiser known for its weight {name!r}; cannot randomise it")
        out.append(np.asarray(value).astype(variable.dtype))
    return out


def _seeded(initializer, seed: int):
    """A copy of a Keras initialiser with this seed (constant initialisers have none to set)."""
    config = initializer.get_config()
    if "seed" in config:
        config["seed"] = seed
    return type(initializer).from_config(config)


FILLS = ("black", "blur")


def fill_image(image: np.ndarray, fill: str) -> np.ndarray:
    """What a deleted pixel becomes. ``black``: zero, as in Petsiuk et al.; ``blur``: the image under
    a wide Gaussian blur, so a deletion removes detail without drawing new sharp edges the model
    may react to (the concern behind ROAD, Rong et al. 2022)."""

    if fill == "black":
        return np.zeros_like(image)
    if fill == "blur":
        sigma = max(image.shape[:2]) / 16
        return gaussian_filter(image, sigma=(sigma, sigma) + (0,) * (image.ndim - 2))
    raise CovidlibError(f"unknown fill {fill!r}; valid: {', '.join(FILLS)}")


def deletion_insertion(model, images, heats, *, class_name: str = "covid", steps: int = 20, seed: int = 0,
                       fill: str = "black", kinds: tuple[str, ...] = ("deletion", "insertion"),
                       chunk: int = 512, grid: tuple[int, int] | None = None) -> list[dict]:
    """Per image: area under P(class) as the most salient pixels are deleted (set to ``fill``) or
    inserted (into the ``fill`` image).

    A faithful map has a low deletion AUC and a high insertion AUC; the same numbers
    for a random order (each image its own, drawn from ``seed``) are returned alongside as the
    baseline. The random order removes whole cells of ``grid`` (the map's own resolution, e.g. 7x7
    for Grad-CAM on a deep backbone; default: single pixels), so map and random order delete blocks
    of like size: scattered single pixels barely change a CNN's input, which flattered every map.
    The perturbed copies of all the images go through the model together, at most ``chunk`` at a
    time (a ``predict`` per image cost 0.3-0.4 s of overhead each on a CPU).
    """
    if not kinds or set(kinds) - {"deletion", "insertion"}:
        raise CovidlibError(f"kinds must be deletion and/or insertion, got {kinds!r}")

    x, heats = _as_batch(images), np.asarray(heats).reshape(-1, *np.shape(heats)[-2:])
    rng = np.random.default_rng(seed)
    orders = [[np.argsort(-heat.ravel(), kind="stable"), _block_order(heat.shape, grid, rng)] for heat in heats]
    per_image = 2 * (steps + 1) * len(kinds)
    group = max(1, chunk // per_image)
    p = np.concatenate([predict_covid(model, np.concatenate([_perturbed(img, o, fill, steps, kinds)
                                                              for img, o in zip(x[i:i + group], orders[i:i + group])]))
                        for i in range(0, len(x), group)])
    p = (p if _class(class_name) == 1 else 1 - p).reshape(len(x), 2, steps + 1, len(kinds))  # image, order, step, kind
    auc = np.trapezoid(p, dx=1.0 / steps, axis=2)
    return [{f"{kind}_auc_{name}": float(auc[n, i, j]) for i, name in enumerate(("map", "random"))
             for j, kind in enumerate(kinds)} for n in range(len(x))]


def _block_order(shape: tuple[int, int], grid: tuple[int, int] | None, rng: np.random.Generator) -> np.ndarray:
    """A random pixel order that takes the cells of a ``grid`` (rows, columns) over the image one whole
    cell after another, in random order (raster order inside a cell)."""
    h, w = shape
    gh, gw = grid or shape
    cell = (np.arange(h)[:, None] * gh // h) * gw + np.arange(w)[None, :] * gw // w
    return np.argsort(rng.permutation(gh * gw)[cell].ravel(), kind="stable")


def map_grid(model, images, method: str, *, layer: str | None = None, class_name: str = "covid") -> tuple[int, int]:
    """The resolution a method's maps have before they are upsampled to the image (the target layer's
    for Grad-CAM and the activation heat map, the input's for saliency)."""
    return maps_and_grid(model, _as_batch(images)[:1], method, layer=layer, class_name=class_name)[1]


def maps_and_grid(model, images, method: str, *, layer: str | None = None,
                  class_name: str = "covid") -> tuple[np.ndarray, tuple[int, int]]:
    """A map method's maps (``heatmap``: the target layer's mean absolute activation, the per-layer
    heat maps of :mod:`covidlib.explain.layers`, no class, no gradient) and their :func:`map_grid`,
    from one pass (a deep model's gradient costs seconds on a CPU; another batch size traces again)."""
    x = _as_batch(images)
    if method == "heatmap":
        act = np.asarray(_Forward(model, [layer or find_target_layer(model)])(x)[0][0])
        return np.stack([heatmap(a, x.shape[1:3]) for a in act]), tuple(act.shape[1:3])
    if method not in _MAPS:
        raise CovidlibError(f"unknown method {method!r}; valid: {', '.join((*_MAPS, 'heatmap'))}")
    raw = _MAPS[method].maps(model, x, layer, _class(class_name))
    return _upsample(raw, x.shape[1:3]), tuple(raw.shape[1:3])


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
SANITY_STAGES = {"top": 0.0, "half": 0.5, "all": 1.0}  # share of the weighted layers re-initialised
SANITY_SCORES = (*(f"{score}_{stage}_{m}" for m in SANITY_METHODS for stage in SANITY_STAGES
                   for score in ("spearman", "blank")),
                 "lung_share", "lung_share_uniform",
                 *(f"{kind}_{fill}_{order}" for fill, kinds in SANITY_CURVES.items() for kind in kinds
                   for order in ("map", "random")))


def sanity(run: str | Path, n: int = 20, method: str = "gradcam", steps: int = 6,
           methods: tuple[str, ...] = SANITY_METHODS) -> pd.DataFrame:
    """Sanity scores of one model's maps, one row per test slice: ``n`` COVID and ``n`` non-COVID slices
    chosen by the split (not by how sure the model is), each explained for its own class.

    Columns, for every randomised method ``m`` of ``methods``: rank correlation with the trained map
    after re-initialising the top layer, half and all of the weighted layers (``spearman_top_m``, ...;
    NaN where either map is blank) and whether the randomised map came out blank (``blank_top_m``, ...).
    For ``method``: deletion / insertion AUCs in the map's order and a random order of the map's own
    cells, deleting to black (both ways) and to a blurred copy (``deletion_black_map``, ...); the map's
    share inside the lung fields and a uniform map's.
    """
    run = Path(run)
    model = RunFolder(run).load_model()
    rows = []
    for label, class_name in ((1, "covid"), (0, "non-covid")):
        paths = reference_paths(run, n, label)
        if not paths:
            continue
        images, _ = RunFolder(run).slices(paths)
        x = np.stack(images)
        heats, grid = maps_and_grid(model, x, method, class_name=class_name)
        columns = _randomisation_columns(model, x, class_name, methods, {method: heats})
        curves = {fill: deletion_insertion(model, x, heats, class_name=class_name, steps=steps, fill=fill,
                                             kinds=kinds, grid=grid) for fill, kinds in SANITY_CURVES.items()}
        for i, (path, img, heat) in enumerate(zip(paths, images, heats)):
            row = {"path": path, "label": label, **{k: v[i] for k, v in columns.items()},
                   **lung_share(heat, lung_mask(img))}
            for fill, scores in curves.items():
                row.update({k.replace("_auc_", f"_{fill}_"): v for k, v in scores[i].items()})
            rows.append(row)
    return pd.DataFrame(rows)


def _randomisation_columns(model, x: np.ndarray, class_name: str, methods: tuple[str, ...],
                           references: dict[str, np.ndarray] | None = None) -> dict[str, list]:
    """Per-image ``spearman_STAGE_METHOD`` and ``blank_STAGE_METHOD`` from one cascade over every method."""
    stage_of = dict(zip(SANITY_STAGES, cascade_stages(model, tuple(SANITY_STAGES.values()), distinct=False)))
    cascade = randomisation_test(model, x, class_name=class_name, stages=tuple(sorted(set(stage_of.values()))),
                                 methods=methods, references=references)
    found = {(r["method"], r["layers_randomised"]): r for r in cascade}
    out = {}
    for m in methods:
        for stage, k in stage_of.items():
            out[f"spearman_{stage}_{m}"] = found[m, k]["spearman_per_image"]
            out[f"blank_{stage}_{m}"] = found[m, k]["blank_per_image"]
    return out


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


