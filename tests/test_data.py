from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from covidlib import CovidlibError
from covidlib.cli import main
from covidlib.data import dataset as dataset_mod
from covidlib.data import fetch as fetch_mod
from covidlib.data import images as images_mod
from covidlib.paths import atomic_path
from tests.conftest import make_folder, write_png


@pytest.mark.parametrize(
    "name, expected",
    [("COVID", "COVID"), ("covid", "COVID"), ("CT_COVID", "COVID"), ("COVID-19", "COVID"),
     ("non-COVID", "non-COVID"), ("NonCOVID", "non-COVID"), ("non_covid", "non-COVID"),
     ("CT_NonCOVID", "non-COVID"), ("NON-covid", "non-COVID"), ("normal", None), ("images", None)],
)
def test_class_folder_names(name, expected):
    assert dataset_mod.canonical_class(name) == expected


@pytest.mark.parametrize("names", [("CT_COVID", "CT_NonCOVID"), ("covid", "non_covid"), ("COVID", "NonCOVID")])
def test_discovers_name_variants(tmp_path, names):
    ds = dataset_mod.load_dataset(make_folder(tmp_path, names, n=3))
    assert ds.counts() == {"non-COVID": 3, "COVID": 3}
    assert set(ds.manifest["y"][ds.manifest["label"] == "COVID"]) == {1}


def test_manifest_hash_is_location_independent(tmp_path, sample_data):
    a = dataset_mod.load_dataset(sample_data)
    copy = shutil.copytree(sample_data, tmp_path / "copy")
    assert dataset_mod.load_dataset(copy).manifest_hash == a.manifest_hash
    (copy / "COVID" / sorted(p.name for p in (copy / "COVID").iterdir())[0]).unlink()
    assert dataset_mod.load_dataset(copy).manifest_hash != a.manifest_hash


def _corrupt(p):
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)


def _truncated(p):
    write_png(p, size=(200, 200))
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


BAD_FILES = {
    "corrupt": ("COVID/bad.png", _corrupt, "corrupt"),
    "truncated": ("COVID/cut.png", _truncated, "truncated"),
    "zero-byte": ("COVID/empty.png", lambda p: p.write_bytes(b""), "zero-byte"),
    "ds_store": ("COVID/.DS_Store", lambda p: p.write_bytes(b"\0\0\0\1Bud1"), "not an image"),
    "thumbs": ("non-COVID/Thumbs.db", lambda p: p.write_bytes(b"\xd0\xcf\x11\xe0"), "not an image"),
    "text": ("non-COVID/notes.txt", lambda p: p.write_text("hello"), "not an image"),
    "tiny": ("COVID/tiny.png", lambda p: write_png(p, size=(8, 8)), "smaller than 16"),
}


@pytest.mark.parametrize("kind", BAD_FILES)
def test_bad_files_fail_with_one_line_naming_the_file(tmp_path, kind, capsys):
    rel, make, words = BAD_FILES[kind]
    root = make_folder(tmp_path / "ds")
    make(root / rel)
    with pytest.raises(CovidlibError, match=words) as err:
        dataset_mod.load_dataset(root)
    assert rel.split("/")[-1] in str(err.value)
    assert main(["data", "info", "--data", str(root)]) == 2
    out = capsys.readouterr()
    assert out.out == "" and len(out.err.strip().splitlines()) == 1 and rel.split("/")[-1] in out.err


@pytest.mark.parametrize("kind", BAD_FILES)
def test_skip_bad_lists_and_skips(tmp_path, kind, capsys):
    rel, make, words = BAD_FILES[kind]
    root = make_folder(tmp_path / "ds")
    make(root / rel)
    ds = dataset_mod.load_dataset(root, skip_bad=True)
    assert ds.counts() == {"non-COVID": 4, "COVID": 4}
    assert [b.path for b in ds.bad] == [rel]
    assert main(["data", "info", "--data", str(root), "--skip-bad"]) == 0
    assert f"skipped      {rel}" in capsys.readouterr().out


@pytest.mark.parametrize(
    "setup, words",
    [
        (lambda r: None, "does not exist"),
        (lambda r: (r.mkdir(), (r / "COVID").mkdir(), make_folder(r, ("non-COVID",))), "COVID is empty"),
        (lambda r: make_folder(r, ("COVID",)), "only one class"),
        (lambda r: make_folder(r, ("cats", "dogs")), "no class folders"),
        (lambda r: (r.parent.mkdir(exist_ok=True), r.write_text("x")), "not a folder"),
    ],
    ids=["missing", "empty-class", "one-class", "no-classes", "file-not-folder"],
)
def test_bad_folders(tmp_path, setup, words, capsys):
    root = tmp_path / "ds"
    setup(root)
    with pytest.raises(CovidlibError, match=words):
        dataset_mod.load_dataset(root)
    assert main(["data", "info", "--data", str(root)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_unknown_option_value_is_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["data", "split", "--kind", "bogus"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--kind" in err and "random" in err


def test_read_image_modes(tmp_path):
    # 16-bit: full scale maps to 255, half scale to 128
    arr16 = np.array([[0, 32896], [65535, 65535]], np.uint16).repeat(10, 0).repeat(10, 1)
    Image.fromarray(arr16).save(tmp_path / "deep.png")
    g = images_mod.read_image(tmp_path / "deep.png")
    assert g.dtype == np.uint8 and g.shape == (20, 20, 1)
    assert g[0, 0, 0] == 0 and g[0, 15, 0] == 128 and g[15, 0, 0] == 255
    # palette, RGBA and RGB all come out as the same grey values
    grey = np.tile(np.arange(0, 250, 10, dtype=np.uint8), (20, 1))
    Image.fromarray(grey, "L").convert("P").save(tmp_path / "pal.png")
    rgba = np.dstack([grey, grey, grey, np.full_like(grey, 255)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(grey, "L").convert("RGB").save(tmp_path / "rgb.jpg", quality=100)
    for name, tol in [("pal.png", 0), ("rgba.png", 0), ("rgb.jpg", 3)]:
        out = images_mod.read_image(tmp_path / name)[..., 0]
        assert np.abs(out.astype(int) - grey).max() <= tol, name
    three = images_mod.read_image(tmp_path / "rgba.png", size=32, channels=3)
    assert three.shape == (32, 32, 3) and (three[..., 0] == three[..., 2]).all()


def test_pad_resize_keeps_aspect():
    wide = np.full((50, 100), 200, np.uint8)
    out = images_mod.resize(wide, 64, "pad")
    assert out.shape == (64, 64)
    assert (out[:15] == 0).all() and (out[-15:] == 0).all() and (out[20:44] == 200).all()
    assert (images_mod.resize(wide, 64, "stretch") == 200).all()


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.csv"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_interrupted_decode_leaves_no_usable_cache(tmp_path, monkeypatch):
    ds = dataset_mod.load_dataset(make_folder(tmp_path / "ds", n=6))
    real = images_mod.read_image
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(images_mod, "read_image", flaky)
    with pytest.raises(KeyboardInterrupt):
        images_mod.decoded(ds, 32)
    from covidlib.paths import cache_dir

    folder = cache_dir() / "decoded"
    mine = [p for p in folder.iterdir() if ds.manifest_hash[:16] in p.name]  # other tests may share the cache
    assert not any((p / "meta.json").exists() for p in mine), "a partial cache looks complete"
    monkeypatch.setattr(images_mod, "read_image", real)
    dec = images_mod.decoded(ds, 32)
    assert dec.images.shape == (12, 32, 32, 1)
    assert [p.name for p in folder.iterdir() if p.name.startswith(".tmp")] == []


def test_decode_cache_is_reused(tmp_path, monkeypatch):
    ds = dataset_mod.load_dataset(make_folder(tmp_path / "ds", n=3))
    first = np.array(images_mod.decoded(ds, 24).images)

    def boom(*a, **k):
        raise AssertionError("decoded twice")

    monkeypatch.setattr(images_mod, "read_image", boom)
    again = images_mod.decoded(ds, 24)
    assert np.array_equal(first, again.images)
    assert list(again.labels) == list(ds.labels)


def test_tf_dataset_casts_per_batch_not_the_whole_set(monkeypatch):
    """The uint8 images go into tf.data as they are; the float cast sees one batch at a time
    (a float32 copy of the full set would be 4x its size in memory)."""
    import tensorflow as tf

    images = np.random.default_rng(0).integers(0, 256, (100, 24, 24, 1), dtype=np.uint8)
    sliced, cast = [], []
    real_slices, real_cast = tf.data.Dataset.from_tensor_slices, tf.cast
    monkeypatch.setattr(tf.data.Dataset, "from_tensor_slices",
                        staticmethod(lambda t: sliced.append(t) or real_slices(t)))
    monkeypatch.setattr(tf, "cast", lambda x, dtype: cast.append(tuple(x.shape)) or real_cast(x, dtype))
    batches = list(images_mod.tf_dataset(images, np.zeros(100, np.int64), batch_size=16, shuffle=True, seed=1))
    assert sliced[0][0].dtype == np.uint8 and sliced[0][0] is images
    image_casts = [shape for shape in cast if len(shape) == 4]
    assert image_casts and all(shape[0] in (None, 16, 4) for shape in image_casts), image_casts
    assert batches[0][0].dtype.name == "float32" and len(batches) == 7


def test_tf_dataset_batches_shapes_targets_and_order(sample_data):
    ds = dataset_mod.load_dataset(sample_data)
    dec = images_mod.decoded(ds, 32)
    images, labels = images_mod.take(dec, list(ds.manifest["path"][:40]))
    batches = list(images_mod.tf_dataset(images, labels, batch_size=16, shuffle=True, seed=1, target="onehot"))
    assert [b[0].shape[0] for b in batches] == [16, 16, 8]
    assert batches[0][0].dtype.name == "float32" and batches[0][1].shape == (16, 2)
    again = list(images_mod.tf_dataset(images, labels, batch_size=16, shuffle=True, seed=1))
    assert np.array_equal(batches[0][0].numpy(), again[0][0].numpy())


def test_fetch_offline_is_one_line(monkeypatch, capsys):
    import kagglehub

    def offline(*a, **k):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(kagglehub, "dataset_download", offline)
    assert main(["data", "fetch"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--data" in err[0] and "COVIDLIB_DATA" in err[0]


@pytest.mark.real_data
def test_real_dataset_counts_and_sizes(real_data, capsys):
    ds = dataset_mod.load_dataset(real_data)
    assert ds.counts() == {"COVID": 1252, "non-COVID": 1229}
    s = ds.summary()
    assert s["width"] == [182, 534] and s["height"] == [119, 416]
    assert main(["data", "info", "--data", str(real_data)]) == 0
    out = capsys.readouterr().out
    assert "1252" in out and "1229" in out and "182-534" in out


def test_a_class_folder_nested_in_the_other_is_refused(tmp_path, capsys):
    root = make_folder(tmp_path / "d")
    write_png(root / "COVID" / "extra" / "non-COVID" / "x.png")  # would have been labelled COVID
    assert main(["data", "info", "--data", str(root)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"covidlib: error: {root / 'COVID' / 'extra' / 'non-COVID'}: a non-COVID folder inside the "
                   "COVID class folder (its images would be labelled COVID); move it out"]


def test_an_unreadable_subfolder_is_an_error_not_a_silent_gap(tmp_path, monkeypatch, capsys):
    import os

    root = make_folder(tmp_path / "d")
    locked = root / "non-COVID" / "more"
    write_png(locked / "y.png")
    real_scandir = os.scandir

    def scandir(path="."):  # as root, chmod cannot make a folder unreadable; the OS error is raised here
        if os.fspath(path) == os.fspath(locked):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    assert main(["data", "info", "--data", str(root)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"covidlib: error: cannot read folder {locked} (Permission denied); its images would be left out"]


def test_a_same_size_swap_with_the_old_mtime_is_seen(tmp_path):
    import os

    root = make_folder(tmp_path / "d")
    target = root / "COVID" / "img0.png"
    Image.fromarray(np.zeros((48, 64), np.uint8)).save(target, compress_level=0)
    before = dataset_mod.load_dataset(root).manifest.set_index("path").loc["COVID/img0.png", "sha256"]
    st = target.stat()
    Image.fromarray(np.full((48, 64), 200, np.uint8)).save(target, compress_level=0)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert target.stat().st_size == st.st_size and target.stat().st_mtime_ns == st.st_mtime_ns
    after = dataset_mod.load_dataset(root).manifest.set_index("path").loc["COVID/img0.png", "sha256"]
    assert after != before


def test_a_decompression_bomb_is_one_line_everywhere(tmp_path, monkeypatch, capsys):
    root = make_folder(tmp_path / "d")
    bomb = write_png(root / "COVID" / "bomb.png", size=(200, 200))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # 40,000 px is over twice the limit: Pillow refuses
    assert main(["data", "info", "--data", str(root)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and str(bomb) in err[0] and "decompression bomb" in err[0]
    assert main(["data", "info", "--data", str(root), "--skip-bad"]) == 0
    assert "skipped      COVID/bomb.png: refused as a decompression bomb" in capsys.readouterr().out
    with pytest.raises(CovidlibError, match="cannot read image"):
        images_mod.read_image(bomb)


def test_a_file_name_cannot_forge_lines_or_drive_the_terminal(tmp_path, capsys):
    root = make_folder(tmp_path / "d")
    evil = root / "COVID" / "x\ncovidlib: all fine\x1b[2J.png"
    evil.write_bytes(b"not a png")
    assert main(["data", "info", "--data", str(root)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "\x1b" not in err and "x\\ncovidlib: all fine\\x1b[2J.png" in err


def test_a_full_disk_is_one_line_not_a_sigbus_and_orphans_of_killed_runs_go(tmp_path, monkeypatch, capsys):
    import errno
    import os

    from covidlib.paths import cache_dir

    root = make_folder(tmp_path / "ds", n=3)
    folder = cache_dir() / "decoded"
    folder.mkdir(parents=True, exist_ok=True)
    dead = folder / ".tmp-abc-40-c1-stretch-pid999999999-x1"  # left by a killed process
    dead.mkdir()
    (dead / "images.npy").write_bytes(b"\0" * 1000)
    mine = folder / f".tmp-abc-40-c1-stretch-pid{os.getpid()}-x2"  # a live process's work in progress
    mine.mkdir()

    def full(fd, offset, length):  # what the kernel says when the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["train", "--arch", "basic_cnn", "--data", str(root), "--input-size", "40", "--max-images", "8",
                 "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"covidlib: error: no room in the cache folder {cache_dir()}"), err
    assert not dead.exists() and mine.exists()
    assert not (tmp_path / "run").exists()  # stopped before its first epoch: nothing left to trip a retry
    assert [p.name for p in folder.iterdir() if p.name.startswith(".tmp") and p != mine] == []


@pytest.mark.parametrize("case", ["cache is a file", "manifest is a folder", "split out is a file"])
def test_paths_of_the_wrong_kind_are_one_line(tmp_path, sample_data, monkeypatch, case, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    args = ["data", "info", "--data", str(sample_data)]
    if case == "cache is a file":
        monkeypatch.setenv("COVIDLIB_CACHE", str(a_file))
    elif case == "manifest is a folder":
        args += ["--manifest", str(tmp_path)]
    else:
        args = ["data", "split", "--data", str(sample_data), "--out", str(a_file)]
    assert main(args) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("covidlib: error: ") and str(tmp_path) in err[0], err


def test_a_class_folder_that_a_spreadsheet_would_run_is_refused(tmp_path, capsys):
    root = make_folder(tmp_path / "d", names=("=COVID", "non-COVID"))
    assert main(["data", "info", "--data", str(root)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "starts with '='" in err[0] and "formula" in err[0]


def test_a_killed_writers_partial_file_is_removed_by_the_next_write(tmp_path):
    import os

    from covidlib.paths import write_text_atomic

    target = tmp_path / "state.json"
    dead = tmp_path / ".tmp-state.json-pid999999999-abc"  # a writer killed mid-write left this
    dead.write_text('{"epoch": ')
    live = tmp_path / f".tmp-state.json-pid{os.getpid()}-def"  # a live writer's file is not touched
    live.write_text("")
    write_text_atomic(target, "{}")
    assert target.read_text() == "{}" and not dead.exists() and live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, live.name])


def test_an_unreadable_image_is_one_line(tmp_path, monkeypatch, capsys):
    from pathlib import Path

    root = make_folder(tmp_path / "d")
    locked = root / "COVID" / "img1.png"
    real = Path.read_bytes

    def read_bytes(self):  # as root, chmod cannot make a file unreadable; the OS error is raised here
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    assert main(["data", "info", "--data", str(root)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"covidlib: error: {locked}: cannot read the file (Permission denied) (--skip-bad skips it)"]


def _ucsd_zips(tmp_path: Path) -> dict[str, str]:
    """Two zips laid out like UCSD's Images-processed: a top folder, JPEG and RGB PNG, macOS debris."""
    import zipfile

    urls = {}
    for folder, n in (("CT_COVID", 3), ("CT_NonCOVID", 4)):
        archive = tmp_path / f"{folder}.zip"
        with zipfile.ZipFile(archive, "w") as z:
            for i in range(n):
                img = write_png(tmp_path / "src" / folder / f"{i}.png", size=(90 + i, 70), mode="RGB", seed=i + 10 * n)
                if i % 2:
                    jpg = img.with_suffix(".jpg")
                    Image.open(img).save(jpg, quality=90)
                    img = jpg
                z.write(img, f"{folder}/{img.name}")
            z.writestr(f"__MACOSX/{folder}/._0.png", b"resource fork")
        urls[folder] = archive.as_uri()
    return urls


def test_fetch_ucsd_unpacks_both_classes_into_place(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fetch_mod, "UCSD_ZIPS", _ucsd_zips(tmp_path))
    out = tmp_path / "ucsd"
    assert main(["data", "fetch", "--dataset", "ucsd-covid-ct", "--out", str(out)]) == 0
    ds = dataset_mod.load_dataset(out)
    assert ds.counts() == {"COVID": 3, "non-COVID": 4}
    assert {p.suffix for p in out.rglob("*.*")} == {".png", ".jpg"}
    assert f"--external {out}" in capsys.readouterr().out
    assert not list(tmp_path.glob(".tmp-ucsd-*"))


def test_fetch_ucsd_offline_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    import urllib.error
    import urllib.request

    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    out = tmp_path / "ucsd"
    assert main(["data", "fetch", "--dataset", "ucsd-covid-ct", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CT_COVID.zip" in err[0] and "--external" in err[0]
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))
