from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from covidlib import CovidlibError
from covidlib.cli import main
from covidlib.data.dataset import load_dataset
from covidlib.data.splits import (
    clustered_groups,
    file_hash,
    hamming,
    load_split,
    make_kfold,
    make_split,
    near_duplicate_groups,
    phashes,
)
from covidlib.evaluate.baselines import BASELINES


@pytest.fixture(scope="module")
def sample(sample_data):
    return load_dataset(sample_data)


def test_random_split_is_stratified_and_deterministic(sample, tmp_path):
    a = make_split(sample, "random", seed=3).save(tmp_path / "a.csv")
    b = make_split(sample, "random", seed=3).save(tmp_path / "b.csv")
    c = make_split(sample, "random", seed=4).save(tmp_path / "c.csv")
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    t = pd.read_csv(a)
    test = t[t.split == "test"]
    assert len(test) == 40 and (test.label == "COVID").sum() == 20
    assert set(t.split) == {"train", "val", "test"} and len(t) == 200


def test_a_validation_seed_redraws_validation_only(sample):
    main_split, other = make_split(sample, "random", seed=3), make_split(sample, "random", seed=3, val_seed=4)
    a, b = main_split.table, other.table
    assert a.loc[a.split == "test", "path"].tolist() == b.loc[b.split == "test", "path"].tolist()
    val_a, val_b = set(a.loc[a.split == "val", "path"]), set(b.loc[b.split == "val", "path"])
    assert len(val_a) == len(val_b) and val_a != val_b
    assert (b[b.split == "val"].label == "COVID").sum() == (a[a.split == "val"].label == "COVID").sum()  # stratified
    assert (main_split.info["val_seed"], other.info["val_seed"]) == (3, 4)


def _crossing_pairs(split, hashes, threshold):
    t = split.table
    tr = np.nonzero((t.split != "test").to_numpy())[0]
    te = np.nonzero((t.split == "test").to_numpy())[0]
    return int((hamming(hashes[te], hashes[tr]) <= threshold).sum())


@pytest.mark.parametrize("threshold", [30, 48, 60])
def test_grouped_split_keeps_near_duplicates_together(sample, threshold):
    hashes = phashes(sample)
    split = make_split(sample, "grouped", seed=0, threshold=threshold)
    assert _crossing_pairs(split, hashes, threshold) == 0
    assert split.info["near_duplicates"]["with_train_near_duplicate"] == 0
    assert 0.1 < (split.table.split == "test").mean() < 0.3


def test_random_split_reports_leakage_that_grouped_removes(sample):
    hashes = phashes(sample)
    rnd = make_split(sample, "random", seed=0, threshold=60)
    reported = rnd.info["near_duplicates"]["with_train_near_duplicate"]
    t = rnd.table
    te = np.nonzero((t.split == "test").to_numpy())[0]
    tr = np.nonzero((t.split != "test").to_numpy())[0]
    expected = int((hamming(hashes[te], hashes[tr]).min(axis=1) <= 60).sum())
    assert reported == expected
    # near-duplicates do exist in this sample, so the number is a real measurement
    assert _crossing_pairs(rnd, hashes, 60) > 0


def test_kfold_covers_every_image_once(sample):
    folds = make_kfold(sample, "grouped", k=4, seed=1)
    tests = [set(f.paths("test")) for f in folds]
    assert sum(len(t) for t in tests) == 200
    assert set().union(*tests) == set(sample.manifest["path"])


def test_hamming_matches_bit_count():
    a = np.array([[0b10110000, 0]], np.uint8)
    b = np.array([[0b00010000, 0xFF], [0b10110000, 0]], np.uint8)
    assert hamming(a, b).tolist() == [[2 + 8, 0]]


def test_groups_join_transitively():
    h = np.zeros((4, 32), np.uint8)
    h[1, 0] = 0b1  # 1 bit from 0
    h[2, 0] = 0b11  # 1 bit from 1, 2 from 0
    h[3] = 0xFF  # far from all
    g = near_duplicate_groups(h, threshold=1)
    assert g[0] == g[1] == g[2] != g[3]


def test_load_split_validates(tmp_path, sample):
    path = make_split(sample, "random").save(tmp_path / "s.csv")
    assert load_split(path, sample).info["sha256"] == file_hash(path)
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label,split\nCOVID/nope.png,COVID,test\n")
    with pytest.raises(CovidlibError, match="not in"):
        load_split(bad, sample)
    with pytest.raises(CovidlibError, match="does not exist"):
        load_split(tmp_path / "missing.csv")


def test_cli_split_writes_csv_and_prints_leakage(tmp_path, sample_data, capsys):
    assert main(["data", "split", "--data", str(sample_data), "--kind", "grouped", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "near-duplicate in train" in out
    assert (tmp_path / "grouped-seed42.csv").exists() and (tmp_path / "grouped-seed42.json").exists()
    assert main(["data", "split", "--data", str(sample_data), "--threshold", "999"]) == 2


def test_cli_scan_split_is_the_studys_patient_proxy_and_grouped_a_choice_it_does_not_train(tmp_path, sample_data,
                                                                                          capsys):
    from covidlib.vocabulary import SPLIT_CHOICES, SPLIT_KINDS

    assert SPLIT_KINDS == ("random", "scan") and "grouped" in SPLIT_CHOICES and "grouped" not in SPLIT_KINDS
    assert main(["data", "split", "--data", str(sample_data), "--kind", "scan", "--out", str(tmp_path)]) == 0
    assert "scan neighbour (+-1 file number" in capsys.readouterr().out
    table = pd.read_csv(tmp_path / "scan-seed42.csv")
    assert table.groupby("group")["split"].nunique().max() == 1
    with pytest.raises(CovidlibError, match="valid: random, scan, grouped"):
        make_split(load_dataset(sample_data), "patient")


@pytest.mark.real_data
def test_real_splits(real_data):
    ds = load_dataset(real_data)
    rnd = make_split(ds, "random", seed=42)
    c = rnd.info["counts"]
    assert sum(c["test"].values()) == 497 and sum(c["train"].values()) + sum(c["val"].values()) == 1984
    grp = make_split(ds, "grouped", seed=42)
    assert grp.info["near_duplicates"]["with_train_near_duplicate"] == 0
    assert rnd.info["near_duplicates"]["with_train_near_duplicate"] > 100


def test_a_split_file_that_leaks_or_mislabels_is_refused(tmp_path, sample):
    table = make_split(sample, "random").table
    leak = table.copy()
    moved = leak.index[leak["split"] == "train"][0]
    leak = pd.concat([leak, leak.loc[[moved]].assign(split="test")])  # a training image also in test
    leak.to_csv(tmp_path / "leak.csv", index=False)
    with pytest.raises(CovidlibError, match=r"lists .* more than once \((train and test|test and train)\)"):
        load_split(tmp_path / "leak.csv", sample)
    wrong = table.copy()
    first = wrong.index[wrong["label"] == "COVID"][0]
    wrong.loc[first, "label"] = "non-COVID"  # contradicts its class folder
    wrong.to_csv(tmp_path / "wrong.csv", index=False)
    with pytest.raises(CovidlibError, match=r"labels .* 'non-COVID' but its class folder says 'COVID' \(1 such rows\)"):
        load_split(tmp_path / "wrong.csv", sample)


@pytest.mark.parametrize("args, words", [
    (["--kfold", "1000"], "--kfold must be between 2 and 20 for this dataset, got 1000"),
    (["--kfold", "1"], "--kfold must be between 2 and 20 for this dataset, got 1"),
    (["--val-fraction", "0.99"], "--val-fraction must be between 0 and 0.5"),
    (["--test-fraction", "0.9"], "--test-fraction must be between 0.01 and 0.5, got 0.9"),
])
def test_split_options_out_of_range_are_one_line(tmp_path, sample_data, args, words, capsys):
    assert main(["data", "split", "--data", str(sample_data), "--out", str(tmp_path / "s"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not (tmp_path / "s").exists()


def test_a_damaged_split_record_is_one_line(tmp_path, sample):
    path = make_split(sample, "random").save(tmp_path / "s.csv")
    path.with_suffix(".json").write_text("{not json")
    with pytest.raises(CovidlibError, match=r"s.json: the split record is damaged \(not valid JSON"):
        load_split(path, sample)


def test_clustered_groups_recover_known_clusters():
    """Three look-alike clusters per class (a few bits flipped around a centre) come back exactly."""
    from sklearn.metrics import adjusted_rand_score

    rng = np.random.default_rng(0)
    hashes, labels, truth = [], [], []
    for cluster in range(6):
        centre = rng.integers(0, 2, 256)
        for _ in range(12):
            bits = centre.copy()
            bits[rng.choice(256, 8, replace=False)] ^= 1  # 8 of 256 bits: far closer than other centres (~128)
            hashes.append(np.packbits(bits))
            labels.append(cluster % 2)
            truth.append(cluster)
    groups = clustered_groups(np.array(hashes), np.array(labels), n_groups=6)
    assert adjusted_rand_score(truth, groups) == 1.0
    for g in np.unique(groups):  # no group mixes the classes
        assert len(set(np.array(labels)[groups == g])) == 1


def test_every_level_of_the_sweep_keeps_its_groups_on_one_side(sample):
    from covidlib.evaluate.sweep import coarseness_sweep, sweep_splits

    splits = sweep_splits(sample, levels=(None, 60, 20, 10))
    assert len(splits) == 4
    for groups, split in splits.items():
        t = split.table
        assert t["group"].nunique() == groups == split.info["grouping"]["groups"]
        test_groups = set(t.loc[t["split"] == "test", "group"])
        assert not test_groups & set(t.loc[t["split"] != "test", "group"]), groups
    coarse = splits[min(splits)].info["grouping"]
    assert coarse["method"] == "ward clusters" and coarse["size_quartiles"][-1] < len(sample.manifest) / 2
    sweep = coarseness_sweep(sample, levels=(60, 10), n_resamples=100)
    assert set(sweep["groups"]) == {60, 10} and set(sweep["model"]) == set(BASELINES)
    assert ((sweep["low"] <= sweep["accuracy"]) & (sweep["accuracy"] <= sweep["high"])).all()


def test_a_group_count_without_a_grouped_split_is_refused(sample):
    with pytest.raises(CovidlibError, match="--groups needs --kind grouped"):
        make_split(sample, "random", n_groups=50)
