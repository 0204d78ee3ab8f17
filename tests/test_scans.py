"""Scan-order segments: synthetic sequences with planted scan boundaries are cut exactly there."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import write_array, write_png
from PIL import Image

from covidlib import CovidlibError
from covidlib.data.dataset import load_dataset
from covidlib.data.scans import neighbour_share, scan_segments
from covidlib.data.splits import make_kfold, make_split

# (class folder, file prefix, numbers, scan id, side in px). The base image of each scan is drawn
# once; its slices drift a little from it. Scan 2 continues scan 1's pictures at another size (a
# size cut), scan 3 continues them after a missing number (a gap cut); the others are new pictures.
PLANTED = [("COVID", "Covid", range(1, 5), "a", 64), ("COVID", "Covid", range(5, 10), "b", 64),
           ("COVID", "Covid", range(10, 13), "b", 96), ("COVID", "Covid", range(14, 17), "b", 96),
           ("COVID", "Covid", range(17, 18), "c", 64), ("COVID", "Covid", range(18, 21), "d", 64),
           ("non-COVID", "Non-Covid", range(1, 6), "e", 64), ("non-COVID", "Non-Covid", range(6, 9), "f", 64)]


def _slice(base: str, step: int, side: int) -> np.ndarray:
    """A smooth picture (a 16x16 random field, upsampled) that drifts by small steps along a scan."""
    rng = np.random.default_rng(ord(base))
    field = rng.random((16, 16)) + 0.02 * np.cumsum(rng.normal(size=(step + 1, 16, 16)), axis=0)[-1]
    small = Image.fromarray(np.uint8(255 * np.clip(field, 0, 1)), "L")
    return np.asarray(small.resize((side, side), Image.BICUBIC))


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("scans")
    truth, counter = {}, {}
    for k, (folder, prefix, numbers, base, side) in enumerate(PLANTED):
        for n in numbers:
            step = counter[base] = counter.get(base, -1) + 1
            write_array(root / folder / f"{prefix} ({n}).png", _slice(base, step, side))
            truth[f"{folder}/{prefix} ({n}).png"] = k
    return load_dataset(root), truth


def test_planted_scan_boundaries_are_cut_exactly(planted):
    dataset, truth = planted
    scans = scan_segments(dataset)
    expected = np.array([truth[p] for p in dataset.manifest["path"]])
    found = pd.crosstab(scans.segment, expected)
    assert ((found > 0).sum(axis=1) == 1).all() and ((found > 0).sum(axis=0) == 1).all()  # same partition
    s = scans.summary
    assert (s["segments"], s["per_class"], s["single_slice_segments"]) == (8, {"non-COVID": 2, "COVID": 6}, 1)
    # hash: a->b, b->c, c->d, e->f; size: b at 64 -> 96 px, b at 96 -> c at 64 px (also a hash cut); gap: no 13
    assert s["cuts_by_reason"] == {"hash": 4, "size": 2, "gap": 1}
    # ids run over non-COVID, then COVID, in number order
    first = dataset.manifest.assign(segment=scans.segment, number=scans.numbers).sort_values(["segment", "number"])
    assert first.groupby("segment")["path"].first().tolist()[:3] == [
        "non-COVID/Non-Covid (1).png", "non-COVID/Non-Covid (6).png", "COVID/Covid (1).png"]


def test_a_scan_split_keeps_every_segment_on_one_side(planted):
    dataset, _ = planted
    segment = scan_segments(dataset).segment
    for split in [make_split(dataset, "scan", seed=s, test_fraction=0.3, val_fraction=0) for s in range(3)] + \
            make_kfold(dataset, "scan", k=2, seed=0, val_fraction=0):
        assert (split.table["group"].to_numpy() == segment).all()
        assert split.table.groupby("group")["split"].nunique().max() == 1
        assert 0 < (split.table.split == "test").sum() < len(split.table)
        assert split.info["scan_neighbours"]["test_images"] == (split.table.split == "test").sum()
    assert make_split(dataset, "scan", test_fraction=0.3).info["grouping"]["method"] == "scan-order segments"


def test_scan_neighbours_count_same_class_slices_within_reach():
    """Known answer: test slices 5 and 20 (class 0) and 7 (class 1) against 6 and 9 (class 0) and 30
    (class 1): within +-1 only 5 has one (6); 7 has none, since 6 is of the other class. Against 9
    alone, 5 has a neighbour within +-4 but not within +-3."""
    numbers = np.array([5, 20, 7, 6, 9, 30])
    labels = np.array([0, 0, 1, 0, 0, 1])
    test, reference = np.array([0, 1, 2]), np.array([3, 4, 5])
    assert neighbour_share(numbers, labels, test, reference, 1) == {"reach": 1, "with_neighbour": 1,
                                                                   "fraction": round(1 / 3, 4)}
    assert neighbour_share(numbers, labels, np.array([0, 1]), np.array([4]), 3)["with_neighbour"] == 0
    assert neighbour_share(numbers, labels, np.array([0]), np.array([4]), 4)["with_neighbour"] == 1


def test_a_random_split_records_its_scan_neighbours(planted):
    """Known answer on the planted data: with every COVID slice but 2 and 12 in train, test slice 2
    has 1 and 3 within +-1; 12 has 11 within +-1 (13 is missing)."""
    dataset, _ = planted
    split = make_split(dataset, "random", seed=0, val_fraction=0)
    paths = dataset.manifest["path"]
    test = np.nonzero(paths.isin(["COVID/Covid (2).png", "COVID/Covid (12).png"]).to_numpy())[0]
    train = np.setdiff1d(np.nonzero((dataset.manifest["label"] == "COVID").to_numpy())[0], test)
    from covidlib.data.splits import scan_leakage

    assert scan_leakage(dataset, train, test) == {"test_images": 2, "within_1": 2, "within_3": 2,
                                                  "fraction_within_1": 1.0, "fraction_within_3": 1.0}
    assert set(split.info["scan_neighbours"]) == {"test_images", "within_1", "within_3", "fraction_within_1",
                                                  "fraction_within_3"}


def test_file_names_without_numbers_are_refused_for_scans(tmp_path):
    for k, name in enumerate(["COVID/a.png", "COVID/b.png", "non-COVID/c.png", "non-COVID/d.png"]):
        write_png(tmp_path / name, seed=k)
    dataset = load_dataset(tmp_path)
    with pytest.raises(CovidlibError, match=r"carry no number \(e\.g\. COVID/a\.png\)") as err:
        scan_segments(dataset)
    assert "\n" not in str(err.value)
    with pytest.raises(CovidlibError, match="carry no number"):
        make_split(dataset, "scan")
    assert make_split(dataset, "random", test_fraction=0.5, val_fraction=0).info["scan_neighbours"] is None


def test_two_files_with_one_number_are_refused(tmp_path):
    for k, name in enumerate(["COVID/x1.png", "COVID/y1.png", "non-COVID/c1.png", "non-COVID/c2.png"]):
        write_png(tmp_path / name, seed=k)
    with pytest.raises(CovidlibError, match="COVID/x1.png and COVID/y1.png carry the same number"):
        scan_segments(load_dataset(tmp_path))
