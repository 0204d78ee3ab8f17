"""Per-layer views (the paper's figures 7-8 and 10-11): feature maps, their heat maps, and overlays on the slice."""

from __future__ import annotations

import cv2
import numpy as np

from covidlib import CovidlibError, runtime
from covidlib.explain.maps import LAYER_KINDS, _as_batch, _check_layer, _Forward, _is_spatial, _upsample

# --- per-layer maps (the paper's figures 7-8 and 10-11) ------------------------------------


def feature_map_layers(model) -> list[str]:
    """Every Conv2D, MaxPooling2D and Dropout layer with spatial output, in order."""
    keras = runtime.keras()
    kinds = tuple(getattr(keras.layers, k) for k in LAYER_KINDS)
    out = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            out += [f"{layer.name}/{i.name}" for i in layer.layers if isinstance(i, kinds) and _is_spatial(i)]
        elif isinstance(layer, kinds) and _is_spatial(layer):
            out.append(layer.name)
    return out


def spread_layers(model, n: int = 6) -> list[str]:
    """At most ``n`` of ``feature_map_layers``, spread from the first to the last (figs 7-11 show a few)."""
    layers = feature_map_layers(model)
    if len(layers) <= n:
        return layers
    return [layers[i] for i in np.linspace(0, len(layers) - 1, n).round().astype(int)]


def activations(model, image, layers: list[str] | None = None) -> dict[str, np.ndarray]:
    """Feature maps ``(H, W, C)`` of one image at each requested layer."""
    layers = layers or feature_map_layers(model)
    for name in layers:
        _check_layer(model, name)
    maps, _ = _Forward(model, layers)(_as_batch(image))
    return {n: np.asarray(m)[0] for n, m in zip(layers, maps)}


def heatmap(feature_maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A layer's activations collapsed to one map: mean absolute activation over channels."""
    return _upsample(np.abs(feature_maps).mean(axis=-1)[None], size)[0]


def overlay(gray: np.ndarray, heat: np.ndarray, alpha: float = 0.45, colormap: str = "jet") -> np.ndarray:
    """RGB uint8: the slice in grey with ``heat`` (in [0, 1]) coloured by an OpenCV colormap on top."""
    gray = np.asarray(gray)
    gray = gray[..., 0] if gray.ndim == 3 else gray
    gray = np.clip(gray, 0, 255).astype(np.uint8)
    heat = cv2.resize(np.asarray(heat, np.float32), (gray.shape[1], gray.shape[0]))
    colour = colormap_lut(colormap)[np.uint8(255 * np.clip(heat, 0, 1))]
    base = cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB)
    return cv2.addWeighted(colour, float(alpha), base, 1 - float(alpha), 0)


def colormap_lut(colormap: str = "jet") -> np.ndarray:
    """The colormap as a 256 x 3 RGB uint8 table (the explorer colours maps in the browser with it)."""
    code = getattr(cv2, f"COLORMAP_{colormap.upper()}", None)
    if code is None:
        raise CovidlibError(f"unknown colormap {colormap!r} (any OpenCV COLORMAP_* name, e.g. jet, inferno, turbo)")
    return cv2.applyColorMap(np.arange(256, dtype=np.uint8)[:, None], code)[:, 0, ::-1].copy()


def feature_grid(feature_maps: np.ndarray, max_channels: int = 16) -> np.ndarray:
    """Up to ``max_channels`` channels tiled into one grey uint8 image (figures 7-8)."""
    c = min(max_channels, feature_maps.shape[-1])
    cols = int(np.ceil(np.sqrt(c)))
    rows = int(np.ceil(c / cols))
    h, w = feature_maps.shape[:2]
    grid = np.zeros((rows * (h + 1), cols * (w + 1)), np.uint8)
    for k in range(c):
        m = feature_maps[..., k].astype(np.float64)
        m = (m - m.min()) / (m.max() - m.min() or 1.0)
        r, q = divmod(k, cols)
        grid[r * (h + 1) : r * (h + 1) + h, q * (w + 1) : q * (w + 1) + w] = np.uint8(255 * m)
    return grid


