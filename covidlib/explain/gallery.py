"""Maps of one run for a reader: a gallery of methods on split-chosen slices (figs 12-15) and per-layer maps (figs 7-11)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from covidlib import CovidlibError, plots
from covidlib.evaluate.stats import test_predictions
from covidlib.explain.layers import activations, feature_grid, heatmap, overlay, spread_layers
from covidlib.explain.maps import MAPS_VERSION, explain, supported_methods
from covidlib.models.runs import RunFolder
from covidlib.paths import atomic_path, cache_key


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
    model = RunFolder(run).load_model()
    methods = supported_methods(model, methods)
    images, _ = RunFolder(run).slices(paths)
    tiles, captions = [], []
    for path, img in zip(paths, images):
        tiles.append(np.repeat(np.clip(img[..., :1], 0, 255).astype(np.uint8), 3, axis=-1))  # RGB, so tiles stack
        captions.append(Path(path).name)
        for method in methods:
            tiles.append(overlay(img, explain(model, img, method, class_name=class_name)[0]))
            captions.append(method)
    return tiles, captions, len(methods) + 1


def layer_maps(run: str | Path, path: str | None = None, max_layers: int = 6, channels: int = 16):
    """Figures 7-8 and 10-11 for one positive slice: feature grids and heat maps per layer."""
    run = Path(run)
    model = RunFolder(run).load_model()
    path = path or example_paths(run, 1)[0]
    (img,), size = RunFolder(run).slices([path])
    acts = activations(model, img, spread_layers(model, max_layers))
    grids = plots.image_grid([feature_grid(a, channels) for a in acts.values()], list(acts), cols=3,
                             title=f"{run.name}: feature maps per layer ({Path(path).name})")
    heats = plots.image_grid([overlay(img, heatmap(a, (size, size))) for a in acts.values()], list(acts),
                             cols=3, title=f"{run.name}: per-layer heat maps")
    return grids, heats


# Deleting to black, the paper-era check, both ways; to a blurred copy (ROAD's concern), deletion only:
# every curve point is a forward pass, and the frozen backbones make those the check's main cost.
