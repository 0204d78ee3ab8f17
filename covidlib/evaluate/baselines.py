"""Shortcut baselines: how far do features that are not a CNN get on the same split?

If image size alone or a grey-level histogram already separates the classes, a CNN's
accuracy says less about lungs than it seems. Each baseline trains on train + val and
predicts P(COVID) for the test images, in the same format as a CNN run.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from sklearn.ensemble import RandomForestClassifier
from sklearn.neighbors import KNeighborsClassifier

from covidlib.data.dataset import Dataset, load_dataset
from covidlib.data.images import decoded
from covidlib.data.lungs import lung_mask
from covidlib.data.splits import Split, load_split
from covidlib.models.runs import RunFolder

HIST_BINS = 32
NN_SIZE = 32


def size_features(dataset: Dataset, rows: np.ndarray, images: np.ndarray) -> np.ndarray:
    m = dataset.manifest.iloc[rows]
    return m[["width", "height"]].to_numpy(float)


def histogram_features(dataset: Dataset, rows: np.ndarray, images: np.ndarray) -> np.ndarray:
    hist = np.stack([np.bincount(img.ravel() // (256 // HIST_BINS), minlength=HIST_BINS) for img in images])
    return np.hstack([hist / hist.sum(axis=1, keepdims=True), size_features(dataset, rows, images)])


def lung_histogram_features(dataset: Dataset, rows: np.ndarray, images: np.ndarray) -> np.ndarray:
    """Grey histograms inside and outside the lung mask, apart: which of the two carries the signal
    (disease density inside, or scanner, windowing and body outside) shows in what the forest uses."""
    return np.stack([_inside_outside(img[..., 0]) for img in images])


_SEEN: dict[bytes, np.ndarray] = {}  # image digest -> its two histograms: a study refits the baselines
# on many splits of the same images, and the mask costs milliseconds an image


def _inside_outside(grey: np.ndarray) -> np.ndarray:
    key = hashlib.blake2b(np.ascontiguousarray(grey).tobytes(), digest_size=16).digest() + bytes(grey.shape)
    if key not in _SEEN:
        mask = lung_mask(grey)
        parts = [np.bincount(grey[m].ravel() // (256 // HIST_BINS), minlength=HIST_BINS) for m in (mask, ~mask)]
        _SEEN[key] = np.concatenate([p / max(1, p.sum()) for p in parts])
    return _SEEN[key]


def pixel_features(dataset: Dataset, rows: np.ndarray, images: np.ndarray) -> np.ndarray:

    return np.stack([cv2.resize(img[..., 0], (NN_SIZE, NN_SIZE), interpolation=cv2.INTER_AREA).ravel()
                     for img in images]).astype(float) / 255.0


BASELINES: dict[str, tuple[str, Callable, Callable]] = {
    "size_only": ("image width and height, random forest", size_features,
                  lambda seed: RandomForestClassifier(300, min_samples_leaf=2, random_state=seed)),
    "histogram_size": (f"{HIST_BINS}-bin grey histogram + size, random forest", histogram_features,
                       lambda seed: RandomForestClassifier(300, min_samples_leaf=2, random_state=seed)),
    "histogram_lungs": (f"{HIST_BINS}-bin grey histograms inside and outside the lung mask, random forest",
                        lung_histogram_features,
                        lambda seed: RandomForestClassifier(300, min_samples_leaf=2, random_state=seed)),
    "nearest_neighbour": (f"1-nearest neighbour on {NN_SIZE}x{NN_SIZE} pixels", pixel_features,
                          lambda seed: KNeighborsClassifier(1)),
}


def run_baselines(dataset: Dataset, split: Split, seed: int = 0, image_size: int = 128,
                  external: Dataset | None = None, lungs: str = "whole") -> dict[str, pd.DataFrame]:
    """Predictions ``(path, y, p_covid)`` of every baseline, fitted on ``split``'s train and
    validation slices: on its test slices, or (with ``external``) on every image of another dataset.
    ``lungs`` shows them the slices of one arm of the lung-masked experiment."""
    cache = decoded(dataset, image_size, lungs=lungs)
    index = {p: i for i, p in enumerate(dataset.manifest["path"])}
    fit_rows = np.array([index[p] for p in split.table.loc[split.table["split"] != "test", "path"]])
    target = external if external is not None else dataset
    target_cache = decoded(target, image_size, lungs=lungs) if external is not None else cache
    paths = list(target.manifest["path"]) if external is not None else split.paths("test")
    target_index = {p: i for i, p in enumerate(target.manifest["path"])}
    rows = np.array([target_index[p] for p in paths])
    out = {}
    for name, (_, featurise, make) in BASELINES.items():
        x_fit = featurise(dataset, fit_rows, np.asarray(cache.images[fit_rows]))
        x = featurise(target, rows, np.asarray(target_cache.images[rows]))
        model = make(seed).fit(x_fit, dataset.labels[fit_rows])
        out[name] = pd.DataFrame({"path": paths, "y": target.labels[rows], "p_covid": model.predict_proba(x)[:, 1]})
    return out


def baselines_for_run(run_dir: str | Path, external: Dataset | None = None) -> dict[str, pd.DataFrame]:
    """The baselines on exactly the data and split a CNN run used, so the two are comparable
    (with ``external``: fitted the same way, predicting the external dataset)."""
    run = RunFolder(run_dir)
    dataset = load_dataset(run.data_root)
    return run_baselines(dataset, load_split(run.split_file, dataset), external=external, lungs=run.config().lungs)
