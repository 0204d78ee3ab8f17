"""A map explorer that needs no kernel: every map precomputed when the notebook runs, drawn by a few
lines of JavaScript in the built book (and in JupyterLab), offline.

The slices are the split's (the same for every model); each model's maps are made once and kept in
its run folder. Maps travel as small grey JPEGs and are coloured and blended in the browser with the
same colormap as ``overlay``, so the opacity slider works without a kernel too.
"""

from __future__ import annotations

import base64
import html
import json
import uuid
from importlib import resources
from pathlib import Path

import cv2
import numpy as np

from covidlib import CovidlibError
from covidlib.evaluate.tables import title
from covidlib.explain.gallery import reference_paths
from covidlib.explain.layers import activations, colormap_lut, feature_grid, heatmap, spread_layers
from covidlib.explain.maps import MAPS_VERSION, explain, supported_methods
from covidlib.models.runs import RunFolder
from covidlib.paths import atomic_path, cache_key
from covidlib.vocabulary import CLASS_KEYS, CLASS_NAMES

# What the menu offers, in order; CAM only where the model pools before its head.
GRADIENT_METHODS = {"cam": "CAM", "gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "saliency": "saliency"}
LAYER_METHODS = {"activations": "layer activations (figs 7-8)", "heatmaps": "layer heat map (figs 9-11)"}
MAX_MAP_SIDE = 112  # px kept per map: Grad-CAM is coarser than this, saliency still readable
EXPLORER_VERSION = 2  # 2: a blank map carries its reason


def _jpeg(gray: np.ndarray, side: int | None = None) -> str:
    gray = np.clip(np.asarray(gray, np.float32), 0, 255).astype(np.uint8)
    if side and max(gray.shape) > side:
        gray = cv2.resize(gray, (side, side), interpolation=cv2.INTER_AREA)
    ok, buffer = cv2.imencode(".jpg", gray, [cv2.IMWRITE_JPEG_QUALITY, 88])
    return "data:image/jpeg;base64," + base64.b64encode(buffer.tobytes()).decode()


def _heat(heat: np.ndarray) -> str | dict:
    """A map in [0, 1] as a grey JPEG; a blank one (not finite, or under one grey level of range) as
    its reason, which the page says instead of painting the slice one colour."""
    heat = np.asarray(heat, np.float32)
    if not np.isfinite(heat).all():
        return {"blank": "not finite: the computation failed"}
    if np.ptp(heat) < 1 / 255:
        return {"blank": "the same value everywhere"}
    return _jpeg(255 * heat, MAX_MAP_SIDE)


def explorer_slices(runs: dict[str, str | Path], per_class: int = 3) -> list[str]:
    """COVID then non-COVID test slices, spread over the split's sorted list (no model chooses them)."""
    if not runs:
        raise CovidlibError("no finished runs to explore")
    first = next(iter(runs.values()))
    paths = reference_paths(first, per_class, 1) + reference_paths(first, per_class, 0)
    if not paths:
        raise CovidlibError(f"{first}: no test slices to explore")
    return paths


def model_maps(run: str | Path, paths: list[str], max_layers: int = 6) -> dict:
    """One model's entry: the slices as it sees them, P(COVID), every gradient map for both classes and
    the per-layer views; kept in the run folder (a finished run's model never changes)."""
    folder = RunFolder(run)
    stored = folder.explain_dir / f"{cache_key('explorer', EXPLORER_VERSION * 100 + MAPS_VERSION, *paths, max_layers)}.json"
    if stored.exists():
        return json.loads(stored.read_text())
    model = folder.load_model()
    images, size = folder.slices(paths)
    batch = np.stack(images).astype(np.float32)
    maps = {m: {c: [_heat(h) for h in explain(model, batch, m, class_name=c)] for c in CLASS_KEYS}
            for m in supported_methods(model, GRADIENT_METHODS)}
    layers = spread_layers(model, max_layers)
    per_image = [activations(model, img, layers) for img in images]
    predictions = folder.predictions().set_index("path")["p_covid"]
    entry = {"key": folder.name, "title": title(folder.config().arch), "input_size": size,
             "slices": [_jpeg(img[..., 0]) for img in images],
             "p_covid": [round(float(predictions[p]), 4) for p in paths], "maps": maps,
             "layers": [{"name": name,
                         "activations": [_jpeg(feature_grid(acts[name]), 256) for acts in per_image],
                         "heatmaps": [_heat(heatmap(acts[name], (size, size))) for acts in per_image]}
                        for name in layers]}
    with atomic_path(stored, suffix=".json") as tmp:
        Path(tmp).write_text(json.dumps(entry))
    return entry


def explorer_data(runs: dict[str, str | Path], per_class: int = 3) -> dict:
    """Everything the page needs, for the models of one split (name -> run folder)."""
    paths = explorer_slices(runs, per_class)
    labels = RunFolder(next(iter(runs.values()))).predictions().set_index("path")["y"]
    return {"slices": [{"path": p, "name": Path(p).name, "label": CLASS_NAMES[int(labels[p])]} for p in paths],
            "models": [model_maps(run, paths) for run in runs.values()],
            "methods": {**GRADIENT_METHODS, **LAYER_METHODS},
            "classes": {key: CLASS_NAMES[index] for key, index in CLASS_KEYS.items()},
            "colormap": colormap_lut("jet").astype(int).ravel().tolist()}  # overlay()'s


def explorer_html(data: dict) -> str:
    """The explorer as one self-contained HTML fragment (its data inline; no request leaves the page)."""
    page = resources.files("covidlib.explain").joinpath("explorer.html").read_text()
    # no "<", ">" or "&" in the data: nothing in a file name can end or confuse the script element
    payload = json.dumps(data, allow_nan=False).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    heading = html.escape(f"{len(data['models'])} models, {len(data['slices'])} test slices")
    return page.replace("__ID__", f"cx-{uuid.uuid4().hex[:8]}").replace("__TITLE__", heading).replace("__DATA__", payload)
