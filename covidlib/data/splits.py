"""Train / validation / test splits, written to CSV so that anyone can rerun on the same one.

The dataset has no patient IDs, and neighbouring slices of one patient look almost the
same, so a random slice-level split (the paper's) puts near-copies of test slices in
train. ``grouped`` splits keep near-duplicates (perceptual-hash Hamming distance at or
below a threshold, joined transitively) on one side: our best stand-in for a
patient-level split. ``scan`` splits keep whole the segments of consecutively numbered
look-alike slices (``data/scans.py``): the file numbers are scan order in this dataset.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.cluster import AgglomerativeClustering
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, train_test_split

from covidlib import CovidlibError
from covidlib.data.dataset import Dataset
from covidlib.data.hashes import (  # noqa: F401 (hamming: callers of splits keep finding it here)
    DEFAULT_THRESHOLD,
    HASH_BITS,
    hamming,
    hamming_blocks,
    nearest_distance,
    phashes,
)
from covidlib.data.scans import file_numbers, neighbour_share, scan_segments
from covidlib.paths import atomic_path, read_json, write_text_atomic
from covidlib.vocabulary import DEFAULT_SEED, SPLIT_CHOICES


def near_duplicate_groups(hashes: np.ndarray, threshold: int) -> np.ndarray:
    """Connected components of the graph 'Hamming distance <= threshold': one id per image."""
    rows, cols = [], []
    for start, d in hamming_blocks(hashes, hashes):
        r, c = np.nonzero(d <= threshold)
        rows.append(r + start)
        cols.append(c)
    r, c = np.concatenate(rows), np.concatenate(cols)
    graph = coo_matrix((np.ones(len(r), np.int8), (r, c)), shape=(len(hashes), len(hashes)))
    return connected_components(graph, directed=False)[1]


def clustered_groups(hashes: np.ndarray, labels: np.ndarray, n_groups: int) -> np.ndarray:
    """About ``n_groups`` groups of look-alike slices, a stand-in for patients (the data has no IDs).
    Ward clustering of the hash bits, within each class (a patient's slices share one label), with
    each class getting groups in proportion to its size. On 0/1 vectors the squared Euclidean
    distance is the Hamming distance, so Ward merges the clusters whose union adds the least
    Hamming spread, which keeps group sizes far more even than single-linkage components.
    """
    bits = np.unpackbits(hashes, axis=1).astype(np.float32)
    groups = np.empty(len(labels), np.int64)
    offset = 0
    for label in np.unique(labels):
        rows = np.nonzero(labels == label)[0]
        k = int(min(len(rows), max(1, round(n_groups * len(rows) / len(labels)))))
        ids = AgglomerativeClustering(n_clusters=k, linkage="ward").fit_predict(bits[rows]) if k > 1 else np.zeros(len(rows))
        groups[rows] = ids + offset
        offset += k
    return groups


@dataclass
class Split:
    """A split table (path, label, split, group) and the facts that made it."""
    table: pd.DataFrame
    info: dict

    def paths(self, part: str) -> list[str]:
        return list(self.table.loc[self.table["split"] == part, "path"])

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        with atomic_path(path, suffix=".csv") as tmp:
            self.table.to_csv(tmp, index=False)
        write_text_atomic(path.with_suffix(".json"), json.dumps({**self.info, "sha256": file_hash(path)}, indent=2))
        return path


def file_hash(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_split(path: str | Path, dataset: Dataset | None = None) -> Split:
    """Read a split CSV; with a dataset, check that every row names one of its images."""
    path = Path(path)
    if not path.exists():
        raise CovidlibError(f"split file {path} does not exist")
    try:
        table = pd.read_csv(path)
    except Exception as exc:
        raise CovidlibError(f"split file {path} is not a readable CSV ({exc})") from None
    missing_cols = {"path", "label", "split"} - set(table.columns)
    if missing_cols:
        raise CovidlibError(f"split file {path} lacks columns: {', '.join(sorted(missing_cols))}")
    bad = set(table["split"]) - {"train", "val", "test"}
    if bad:
        raise CovidlibError(f"split file {path} has unknown split values: {', '.join(map(str, sorted(bad)))}")
    twice = table.loc[table["path"].duplicated(keep=False)].sort_values("path")
    if len(twice):
        first = twice["path"].iloc[0]
        where = " and ".join(twice.loc[twice["path"] == first, "split"].astype(str))
        raise CovidlibError(f"split file {path} lists {first} more than once ({where}); an image belongs to one split")
    if dataset is not None:
        known = dict(zip(dataset.manifest["path"], dataset.manifest["label"]))
        unknown = [p for p in table["path"] if p not in known]
        if unknown:
            raise CovidlibError(f"split file {path} names {len(unknown)} images not in {dataset.root}, e.g. {unknown[0]}")
        wrong = [(p, lab) for p, lab in zip(table["path"], table["label"]) if known[p] != lab]
        if wrong:
            p, lab = wrong[0]
            raise CovidlibError(f"split file {path} labels {p} {lab!r} but its class folder says {known[p]!r} "
                                f"({len(wrong)} such rows)")
    side = path.with_suffix(".json")
    info = read_json(side, "split record") if side.exists() else {}
    info["sha256"] = file_hash(path)
    info["file"] = str(path)
    return Split(table=table, info=info)


def _groups(dataset: Dataset, kind: str, threshold: int, progress: bool,
            n_groups: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    hashes = phashes(dataset, progress=progress)
    if kind == "random":
        return np.arange(len(dataset.manifest)), hashes
    if kind == "scan":
        return scan_segments(dataset, progress=progress).segment, hashes
    if n_groups:
        return clustered_groups(hashes, dataset.labels, n_groups), hashes
    return near_duplicate_groups(hashes, threshold), hashes


def _partition(y: np.ndarray, groups: np.ndarray, kind: str, fraction: float, seed: int,
               candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split ``candidates`` (indices) into (keep, held_out) with about ``fraction`` held out."""
    yc, gc = y[candidates], groups[candidates]
    if kind == "random":
        keep, held = train_test_split(candidates, test_size=fraction, stratify=yc, random_state=seed)
        return np.sort(keep), np.sort(held)
    n_splits = min(max(2, round(1 / fraction)), len(np.unique(gc)))  # coarse groupings have few groups
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    keep, held = next(folds.split(candidates, yc, gc))
    return candidates[keep], candidates[held]


def make_split(dataset: Dataset, kind: str = "random", *, seed: int = DEFAULT_SEED, test_fraction: float = 0.2,
               val_fraction: float = 0.1, threshold: int = DEFAULT_THRESHOLD, progress: bool = False,
               n_groups: int | None = None, val_seed: int | None = None) -> Split:
    """One train/val/test split. ``random`` is the paper's stratified 80/20 shuffle; ``grouped``
    keeps near-duplicate components together, or with ``n_groups`` about that many clusters of
    look-alike slices (:func:`clustered_groups`, a patient-like grouping). ``seed`` draws the test
    slices; ``val_seed`` (default ``seed``) the validation slices carved out of the rest, so the
    training seeds of one study share a test set and differ in what early stopping watches."""
    _check(kind, test_fraction, val_fraction, threshold)
    if n_groups is not None and (kind != "grouped" or not 10 <= n_groups <= len(dataset.manifest)):
        raise CovidlibError(f"--groups needs --kind grouped and 10..{len(dataset.manifest)} groups, got {n_groups}")
    y = dataset.labels
    groups, hashes = _groups(dataset, kind, threshold, progress, n_groups)
    trainval, test = _partition(y, groups, kind, test_fraction, seed, np.arange(len(y)))
    split = _assemble(dataset, kind, seed, test_fraction, val_fraction, threshold, y, groups, hashes, trainval, test,
                      val_seed=seed if val_seed is None else val_seed)
    sizes = np.bincount(groups)
    method = {"random": "each slice alone", "scan": "scan-order segments"}.get(
        kind, "ward clusters" if n_groups else "near-duplicate components")
    split.info["grouping"] = {"method": method,
                              "groups": int(len(np.unique(groups))),
                              "size_quartiles": [float(q) for q in np.percentile(sizes[sizes > 0], [0, 25, 50, 75, 100])]}
    return split


def make_kfold(dataset: Dataset, kind: str = "random", *, k: int = 5, seed: int = DEFAULT_SEED, val_fraction: float = 0.1,
               threshold: int = DEFAULT_THRESHOLD, progress: bool = False) -> list[Split]:
    """Stratified k-fold (random, grouped or scan): fold i is the test set of split i."""
    smallest = int(dataset.manifest["label"].value_counts().min())
    if not 2 <= k <= min(20, smallest):
        raise CovidlibError(f"--kfold must be between 2 and {min(20, smallest)} for this dataset, got {k}")
    _check(kind, 1 / k, val_fraction, threshold)
    y = dataset.labels
    groups, hashes = _groups(dataset, kind, threshold, progress)
    splitter = (StratifiedKFold(k, shuffle=True, random_state=seed) if kind == "random"
                else StratifiedGroupKFold(k, shuffle=True, random_state=seed))
    out = []
    with warnings.catch_warnings():  # sklearn's UserWarnings (a small class) must not precede a one-line error
        warnings.simplefilter("ignore")
        folds = list(splitter.split(np.zeros(len(y)), y, groups if kind != "random" else None))
    for fold, (trainval, test) in enumerate(folds):
        split = _assemble(dataset, kind, seed, 1 / k, val_fraction, threshold, y, groups, hashes, trainval, test)
        split.info.update(fold=fold, k=k)
        out.append(split)
    return out


def _check(kind: str, test_fraction: float, val_fraction: float, threshold: int) -> None:
    if kind not in SPLIT_CHOICES:
        raise CovidlibError(f"unknown split kind {kind!r}; valid: {', '.join(SPLIT_CHOICES)}")
    if not 0.01 <= test_fraction <= 0.5:
        raise CovidlibError(f"--test-fraction must be between 0.01 and 0.5, got {test_fraction}")
    if not 0 <= val_fraction <= 0.5:
        raise CovidlibError(f"--val-fraction must be between 0 and 0.5 (a share of what is left for training), "
                            f"got {val_fraction}")
    if not 0 <= threshold <= HASH_BITS:
        raise CovidlibError(f"--threshold must be 0..{HASH_BITS} bits, got {threshold}")


def _assemble(dataset, kind, seed, test_fraction, val_fraction, threshold, y, groups, hashes, trainval, test,
              val_seed: int | None = None) -> Split:
    val_seed = seed if val_seed is None else val_seed
    if val_fraction > 0:
        train, val = _partition(y, groups, kind, val_fraction, val_seed + 1, np.sort(trainval))
    else:
        train, val = np.sort(trainval), np.zeros(0, np.int64)
    part = np.empty(len(y), dtype=object)
    part[train], part[val], part[test] = "train", "val", "test"
    table = pd.DataFrame({"path": dataset.manifest["path"], "label": dataset.manifest["label"],
                          "split": part, "group": groups})
    info = {
        "kind": kind, "seed": seed, "val_seed": val_seed, "test_fraction": test_fraction, "val_fraction": val_fraction,
        "near_duplicate_threshold": threshold, "manifest_hash": dataset.manifest_hash,
        "counts": {s: {lab: int(((part == s) & (dataset.manifest["label"] == lab)).sum())
                       for lab in ("COVID", "non-COVID")} for s in ("train", "val", "test")},
        "near_duplicates": leakage(hashes, np.sort(trainval), test, threshold),
        "scan_neighbours": scan_leakage(dataset, np.sort(trainval), test),
    }
    return Split(table=table, info=info)


def leakage(hashes: np.ndarray, train: np.ndarray, test: np.ndarray, threshold: int) -> dict:
    """How many test images have a near-duplicate (distance <= threshold) in train or validation."""
    d = nearest_distance(hashes[test], hashes[train])
    n = int((d <= threshold).sum())
    return {"test_images": int(len(test)), "with_train_near_duplicate": n,
            "fraction": round(n / max(1, len(test)), 4), "threshold": threshold,
            "exact_hash_matches": int((d == 0).sum())}


NEIGHBOUR_REACHES = (1, 3)


def scan_leakage(dataset: Dataset, train: np.ndarray, test: np.ndarray) -> dict | None:
    """How many test images have a same-class train or validation image within +-1 and +-3 file
    numbers (a neighbouring slice of the same scan, in this dataset), so random, grouped and scan
    splits can be compared on the leak the near-duplicate figure misses. ``None`` where the file
    names carry no numbers."""
    try:
        numbers = file_numbers(dataset)
    except CovidlibError:
        return None
    shares = [neighbour_share(numbers, dataset.labels, test, train, reach) for reach in NEIGHBOUR_REACHES]
    return {"test_images": int(len(test)),
            **{f"within_{s['reach']}": s["with_neighbour"] for s in shares},
            **{f"fraction_within_{s['reach']}": s["fraction"] for s in shares}}


def distance_histogram(dataset: Dataset, max_distance: int = 96) -> pd.DataFrame:
    """Nearest-neighbour Hamming distance of every image to any other: picks a threshold."""
    hashes = phashes(dataset)
    d = np.concatenate([np.sort(block, axis=1)[:, 1] for _, block in hamming_blocks(hashes, hashes)])
    counts = np.bincount(np.minimum(d, max_distance + 1), minlength=max_distance + 2)
    return pd.DataFrame({"distance": list(range(max_distance + 1)) + [f">{max_distance}"], "images": counts})
