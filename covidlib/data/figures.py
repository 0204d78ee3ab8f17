"""The dataset tour's figures: image sizes, sample slices, near-duplicate pairs, and the external data beside ours."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import plotly.express as px

from covidlib import plots
from covidlib.data.dataset import load_dataset
from covidlib.data.images import decoded, read_image
from covidlib.data.splits import hamming_blocks, phashes


def distributions_figure(dataset_root: str | Path, external: str | Path):
    """Image size and mean grey level of the training data and the external data, side by side."""
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


def size_figure(dataset):

    fig = px.scatter(dataset.manifest, x="width", y="height", color="label", opacity=0.6,
                     title="Image size by class (each point is one slice)")
    fig.update_layout(height=420)
    return fig


def sample_grid(dataset, per_class: int = 4, seed: int = 0, size: int = 160):
    m = dataset.manifest
    pick = pd.concat([g.sample(per_class, random_state=seed) for _, g in m.groupby("label")])
    images = [read_image(dataset.root / p, size) for p in pick["path"]]
    captions = [f"{lab} ({w}x{h})" for lab, w, h in zip(pick["label"], pick["width"], pick["height"])]
    return plots.image_grid(images, captions, cols=per_class, title="Sample slices")


def lung_views_figure(dataset, per_class: int = 1, seed: int = 0, size: int = 160):
    """Slices as the three arms of the lung-masked experiment see them: whole, lungs out, lungs only."""
    m = dataset.manifest
    pick = pd.concat([g.sample(per_class, random_state=seed) for _, g in m.groupby("label")])
    images, captions = [], []
    for path, label in zip(pick["path"], pick["label"]):
        for view, name in (("whole", "whole slice"), ("no_lungs", "lungs blacked out"), ("lungs_only", "lungs only")):
            images.append(read_image(dataset.root / path, size, lungs=view))
            captions.append(f"{label}: {name}")
    return plots.image_grid(images, captions, cols=3, title="The lung-masked experiment's three views")


def near_duplicate_examples(dataset, n: int = 4, size: int = 160):
    """The closest pairs of distinct slices by perceptual hash: near-copies from one scan."""
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


