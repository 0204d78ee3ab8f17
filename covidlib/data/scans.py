"""The file numbers are scan order: a patient proxy from the order of the files.

In the SARS-CoV-2 CT dataset ``Covid (N).png`` and ``Covid (N+1).png`` are almost always
neighbouring slices of one scan (likewise ``Non-Covid``). Cutting each class's numbered
sequence where consecutive slices stop resembling each other gives segments, one per scan
as far as the pixels can tell: a stand-in for the patient IDs the dataset does not publish,
kept whole by the ``scan`` split kind. A cut falls where the slices on either side stop
resembling each other (every perceptual-hash distance across the cut, between the last
``window`` slices before it and the first ``window`` after, is above a threshold), where the image size jumps (each slice is cropped
to its lungs, so sizes drift by a few percent within a scan and jump between scans), or
where a number is missing (the slice between is unknown).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np

from covidlib import CovidlibError
from covidlib.data.dataset import Dataset
from covidlib.data.hashes import hamming, phashes
from covidlib.vocabulary import CLASS_NAMES

# Consecutive slices of one scan are 16-90 bits apart on the full dataset (median ~64 of 256);
# two slices drawn at random from one class are 70-140 (5th percentile ~88, median ~114).
SCAN_THRESHOLD = 96
# A single slice against its neighbour cut the full dataset into 464 segments, 155 of one slice,
# and looking at the cuts most fell inside one scan (a skipped slice, a noisy one): a split then
# puts the two halves of a scan on both sides. Two slices a side: 229 segments, 66 of one slice.
SCAN_WINDOW = 2
# Within a scan the lung crop drifts by a median 4% and 95% of steps stay under 17% (full dataset).
SIZE_TOLERANCE = 0.25
CUT_REASONS = ("hash", "size", "gap")
_NUMBER = re.compile(r"(\d+)(?!.*\d)")  # the last run of digits in the file's stem


def file_numbers(dataset: Dataset) -> np.ndarray:
    """The number in each file's name (``Covid (12).png`` -> 12), aligned with the manifest rows.

    Refuses a dataset whose file names carry no numbers, or two files of one class with the same
    number: their order is then unknown, so no scan can be read from it.
    """
    stems = [PurePosixPath(p).stem for p in dataset.manifest["path"]]
    found = [_NUMBER.search(s) for s in stems]
    missing = [p for p, f in zip(dataset.manifest["path"], found) if f is None]
    if missing:
        raise CovidlibError(f"{dataset.root}: {len(missing)} file names carry no number (e.g. {missing[0]}); "
                            "scan order is read from the numbers in the file names")
    numbers = np.array([int(f.group(1)) for f in found], np.int64)
    keyed = dataset.manifest.assign(number=numbers)
    twice = keyed.loc[keyed.duplicated(["label", "number"], keep=False)].sort_values(["label", "number"])
    if len(twice):
        a, b = twice["path"].iloc[:2]
        raise CovidlibError(f"{dataset.root}: {a} and {b} carry the same number; scan order needs one file per number")
    return numbers


def scan_cuts(numbers: np.ndarray, hashes: np.ndarray, sizes: np.ndarray, *, threshold: int = SCAN_THRESHOLD,
              size_tolerance: float = SIZE_TOLERANCE, window: int = SCAN_WINDOW) -> dict[str, np.ndarray]:
    """For one class's slices in number order: where each reason cuts (``True`` at slice i: a new scan
    starts at i). The first slice starts one by definition and is marked under no reason."""
    step = np.diff(numbers) != 1
    dist = np.array([hamming(hashes[max(0, i - window):i], hashes[i:i + window]).min()
                     for i in range(1, len(hashes))], np.int64).reshape(-1)
    sizes = np.asarray(sizes, np.float64)
    ratio = (np.maximum(sizes[1:], sizes[:-1]) / np.minimum(sizes[1:], sizes[:-1])).max(axis=-1)
    first = np.zeros(1, bool)
    return {"hash": np.concatenate([first, dist > threshold]),
            "size": np.concatenate([first, ratio > 1 + size_tolerance]),
            "gap": np.concatenate([first, step])}


@dataclass
class Scans:
    """One segment id per manifest row (``segment``), the file numbers, and a summary of the segments."""

    segment: np.ndarray
    numbers: np.ndarray
    summary: dict


def scan_segments(dataset: Dataset, *, threshold: int = SCAN_THRESHOLD, size_tolerance: float = SIZE_TOLERANCE,
                  window: int = SCAN_WINDOW, progress: bool = False) -> Scans:
    """Segments of consecutively numbered look-alike slices, within each class; ids run over the
    classes in :data:`CLASS_NAMES` order and in number order within a class."""
    numbers = file_numbers(dataset)
    hashes = phashes(dataset, progress=progress)
    m = dataset.manifest
    segment = np.empty(len(m), np.int64)
    cuts = dict.fromkeys(CUT_REASONS, 0)
    per_class, offset = {}, 0
    for label in CLASS_NAMES:
        rows = np.nonzero((m["label"] == label).to_numpy())[0]
        rows = rows[np.argsort(numbers[rows], kind="stable")]
        found = scan_cuts(numbers[rows], hashes[rows], m[["width", "height"]].to_numpy()[rows],
                          threshold=threshold, size_tolerance=size_tolerance, window=window)
        starts = np.logical_or.reduce(list(found.values()))
        starts[:1] = True
        segment[rows] = np.cumsum(starts) - 1 + offset
        per_class[label] = int(starts.sum())
        offset += per_class[label]
        for reason in CUT_REASONS:
            cuts[reason] += int(found[reason].sum())
    return Scans(segment=segment, numbers=numbers,
                 summary=_summary(segment, per_class, cuts, threshold, size_tolerance, window))


def scan_order(dataset: Dataset) -> list[int | None]:
    """Each manifest row's file number, or None for every row where the names carry no scan order."""
    try:
        return file_numbers(dataset).tolist()
    except CovidlibError:
        return [None] * len(dataset.manifest)


def scan_summary(dataset: Dataset) -> dict | None:
    """:func:`scan_segments`' summary, or None where the file names carry no scan order."""
    try:
        return scan_segments(dataset).summary
    except CovidlibError:
        return None


def _summary(segment: np.ndarray, per_class: dict, cuts: dict, threshold: int, size_tolerance: float,
             window: int) -> dict:
    """Counts a reader can check against a dataset's published patient count (a cut can have several
    reasons at once, so the reasons may add up to more than the cuts)."""
    sizes = np.bincount(segment)
    return {"segments": int(len(sizes)), "per_class": per_class,
            "size_quartiles": [float(q) for q in np.percentile(sizes, [0, 25, 50, 75, 100])],
            "size_mean": round(float(sizes.mean()), 2), "single_slice_segments": int((sizes == 1).sum()),
            "cuts_by_reason": cuts, "hash_threshold": threshold, "size_tolerance": size_tolerance,
            "hash_window": window}


def neighbour_share(numbers: np.ndarray, labels: np.ndarray, test: np.ndarray, reference: np.ndarray,
                    reach: int) -> dict:
    """How many ``test`` rows have a same-class ``reference`` row within ``reach`` file numbers: a
    'scan neighbour', most likely an adjacent slice of the same scan on the other side of the split."""
    hits = np.zeros(len(test), bool)
    for label in np.unique(labels[test]):
        known = set(numbers[reference][labels[reference] == label].tolist())
        mine = labels[test] == label
        hits[mine] = [any(n + d in known for d in range(-reach, reach + 1) if d) for n in numbers[test][mine]]
    n = int(hits.sum())
    return {"reach": reach, "with_neighbour": n, "fraction": round(n / max(1, len(test)), 4)}
