"""Where the lungs are, by classical image processing (no model), and how much of a map lies there.

A CT slice shows a bright body on a dark background with two dark lung fields inside it. The
mask is: the body (Otsu threshold, largest component, its convex hull), the dark pixels inside it
(Otsu again, within the body), opened to cut thin airways and the table, and the two largest
components kept. It is rough on purpose: it only has to tell the lung fields from the border,
the table, the body wall and burnt-in text, so that a reader sees when a model looks there.
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage

from covidlib import CovidlibError


def lung_mask(image: np.ndarray, keep: int = 2) -> np.ndarray:
    """Boolean mask of the lung fields of a grey (or RGB) CT slice."""
    grey = np.asarray(image)
    if grey.ndim == 3:
        grey = grey[..., :3].mean(axis=-1)
    grey = cv2.normalize(grey.astype(np.float32), None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    _, body = cv2.threshold(grey, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    body = _hull(_largest(body.astype(bool), 1))  # convex: a lung cut by the image edge stays inside
    inside = grey[body]
    if inside.size == 0 or inside.min() == inside.max():
        return np.zeros(grey.shape, bool)
    t, _ = cv2.threshold(inside.reshape(-1, 1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    dark = body & (grey <= t)
    dark = ndimage.binary_erosion(body, iterations=max(1, min(grey.shape) // 64)) & dark  # off the body wall
    radius = max(1, min(grey.shape) // 50)
    dark = ndimage.binary_opening(dark, structure=np.ones((2 * radius + 1,) * 2, bool))
    return ndimage.binary_fill_holes(_largest(dark, keep))


# The lung-masked experiment's three views of a slice: as it is, with the lung fields blacked out
# (does a model still tell the classes apart with no lungs to look at?), and the lung fields alone.
LUNG_VIEWS = ("whole", "no_lungs", "lungs_only")


def lung_view(grey: np.ndarray, view: str) -> np.ndarray:
    """A 2-D uint8 slice as ``view`` shows it; the mask is drawn on the slice itself, black is 0."""
    if view == "whole":
        return grey
    if view not in LUNG_VIEWS:
        raise CovidlibError(f"unknown lung view {view!r}; valid: {', '.join(LUNG_VIEWS)}")
    mask = lung_mask(grey)
    return np.where(mask if view == "no_lungs" else ~mask, 0, grey).astype(grey.dtype)


def _hull(mask: np.ndarray) -> np.ndarray:

    points = cv2.findNonZero(mask.astype(np.uint8))
    out = np.zeros(mask.shape, np.uint8)
    if points is not None:
        cv2.fillConvexPoly(out, cv2.convexHull(points), 1)
    return out.astype(bool)


def _largest(mask: np.ndarray, keep: int) -> np.ndarray:

    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = ndimage.sum(mask, labels, range(1, n + 1))
    largest = np.argsort(sizes)[::-1][:keep] + 1
    return np.isin(labels, largest)


def lung_share(heat: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """The share of a map's mass inside the lung mask, beside the share a uniform map would have."""
    heat = np.clip(np.asarray(heat, np.float64), 0, None)
    total = heat.sum()
    return {"lung_share": float((heat * mask).sum() / total) if total > 0 else float("nan"),
            "lung_share_uniform": float(mask.mean())}
