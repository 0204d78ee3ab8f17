"""Find a CT dataset on disk, validate it, fingerprint it, and decode it once into a cache.

The layout is the Kaggle one: a root folder with one folder per class (``COVID`` and
``non-COVID``, or any of the usual spellings). Labels are ``1 = COVID`` (the positive
class in every metric) and ``0 = non-COVID``; the paper used the opposite integers.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from covidlib import CovidlibError
from covidlib.paths import atomic_path, cache_dir, cache_key, remove_orphans

CLASS_NAMES = ("non-COVID", "COVID")  # index == integer label
POSITIVE_CLASS = "COVID"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
MIN_SIDE = 16
RESIZE_MODES = ("stretch", "pad")

# Truncated PNGs must fail loudly, not decode into grey padding.
Image.LOAD_TRUNCATED_IMAGES = False


def canonical_class(folder_name: str) -> str | None:
    """Map a class folder name to ``COVID`` / ``non-COVID``; ``None`` if it is neither.

    Accepts ``COVID``, ``non-COVID``, ``NonCOVID``, ``non_covid``, ``CT_COVID``,
    ``CT_NonCOVID``, ``COVID-19`` in any case.
    """
    key = re.sub(r"[^a-z0-9]", "", folder_name.lower())
    if key.startswith("ct"):
        key = key[2:]
    key = key.removesuffix("19")
    if key == "covid":
        return "COVID"
    if key in {"noncovid", "notcovid"}:
        return "non-COVID"
    return None


@dataclass(frozen=True)
class BadFile:
    path: str
    reason: str


@dataclass
class Dataset:
    """A validated dataset: one manifest row per usable image, plus the files skipped."""

    root: Path
    manifest: pd.DataFrame
    bad: list[BadFile] = field(default_factory=list)

    @property
    def manifest_hash(self) -> str:
        return manifest_hash(self.manifest)

    @property
    def labels(self) -> np.ndarray:
        return self.manifest["y"].to_numpy(np.int64)

    def counts(self) -> dict[str, int]:
        return {name: int((self.manifest["label"] == name).sum()) for name in CLASS_NAMES}

    def abs_paths(self) -> list[Path]:
        return [self.root / p for p in self.manifest["path"]]

    def summary(self) -> dict:
        m = self.manifest
        return {
            "root": str(self.root),
            "images": int(len(m)),
            "counts": self.counts(),
            "width": [int(m["width"].min()), int(m["width"].max())],
            "height": [int(m["height"].min()), int(m["height"].max())],
            "distinct_sizes": int(m.groupby(["width", "height"]).ngroups),
            "manifest_hash": self.manifest_hash,
            "skipped": [{"path": b.path, "reason": b.reason} for b in self.bad],
        }


def manifest_hash(manifest: pd.DataFrame) -> str:
    """sha256 over sorted ``path,label,sha256`` lines: the same data anywhere gives the same hash."""
    rows = sorted(zip(manifest["path"], manifest["label"], manifest["sha256"]))
    text = "".join(f"{p},{lab},{h}\n" for p, lab, h in rows)
    return hashlib.sha256(text.encode()).hexdigest()


def _class_folders(root: Path) -> dict[str, Path]:
    if not root.exists():
        raise CovidlibError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise CovidlibError(f"data path {root} is not a folder")
    found: dict[str, Path] = {}
    for child in sorted(root.iterdir()):
        if not child.is_dir():
            continue
        name = canonical_class(child.name)
        if name is None:
            continue
        if child.name[0] in "=+-@\t\r":
            # every relative path in the CSVs we write starts with this name: a spreadsheet would run it
            raise CovidlibError(f"class folder {child} starts with {child.name[0]!r}, which spreadsheets read as "
                                "a formula in the CSV files covidlib writes; rename it")
        if name in found:
            raise CovidlibError(
                f"data folder {root} has two {name} class folders: {found[name].name} and {child.name}"
            )
        found[name] = child
    if not found:
        raise CovidlibError(
            f"data folder {root} has no class folders (expected COVID and non-COVID, "
            "or variants such as NonCOVID, non_covid, CT_COVID, CT_NonCOVID)"
        )
    missing = [c for c in CLASS_NAMES if c not in found]
    if missing:
        present = ", ".join(p.name for p in found.values())
        raise CovidlibError(
            f"data folder {root} has only one class ({present}); the {missing[0]} class folder is missing"
        )
    return found


# What Pillow raises for a file that is not a usable image: unreadable, corrupt, truncated,
# or a decompression bomb (more pixels than Pillow's safety limit).
DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _inspect(path: Path) -> tuple[int, int, str] | str:
    """Return (width, height, sha256) for a good image, else the reason it is bad."""
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return "not an image file"
    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"cannot read the file ({exc.strerror or type(exc).__name__})"
    if not data:
        return "zero-byte file"
    try:
        with Image.open(path) as im:
            im.load()
            width, height = im.size
    except Image.DecompressionBombError as exc:
        return f"refused as a decompression bomb ({str(exc).split('.')[0]})"
    except DECODE_ERRORS as exc:
        return f"corrupt or truncated image ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
    if min(width, height) < MIN_SIDE:
        return f"image is {width}x{height}, smaller than {MIN_SIDE} px"
    return width, height, hashlib.sha256(data).hexdigest()


def _stat_signature(files: Sequence[tuple[str, str, Path]]) -> str:
    """The manifest cache key (version 2: inode and ctime). ctime changes whenever a file's content
    is replaced and cannot be set back by a user (mtime can, e.g. ``cp -p``), so a same-size swap
    is never missed."""
    stats = []
    for rel, label, path in files:
        st = path.stat()
        stats.append(f"{rel}|{label}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}")
    return cache_key("manifest", 2, *stats)


def _class_members(folder: Path, label: str) -> list[Path]:
    """Every file under a class folder; refuses an unreadable subfolder or another class nested inside."""

    def unreadable(err: OSError) -> None:
        raise CovidlibError(f"cannot read folder {err.filename} ({err.strerror}); its images would be left out")

    members = []
    for dirpath, dirnames, filenames in os.walk(folder, onerror=unreadable):
        for d in dirnames:
            other = canonical_class(d)
            if other is not None and other != label:
                raise CovidlibError(f"{Path(dirpath) / d}: a {other} folder inside the {label} class folder "
                                    f"(its images would be labelled {label}); move it out")
        members += [Path(dirpath) / f for f in filenames]
    return sorted(members)


def load_dataset(
    root: str | os.PathLike, *, skip_bad: bool = False, progress: bool = False
) -> Dataset:
    """Discover, validate and fingerprint a dataset folder.

    Every file is opened and fully decoded once, so a truncated PNG is caught here and
    not in epoch 7. The result is cached by file names, sizes and mtimes, so the next
    call on unchanged data costs a directory listing.
    """
    root = Path(root).expanduser().resolve()
    folders = _class_folders(root)
    files: list[tuple[str, str, Path]] = []
    for label, folder in folders.items():
        members = _class_members(folder, label)
        if not members:
            raise CovidlibError(f"class folder {folder} is empty")
        files += [(p.relative_to(root).as_posix(), label, p) for p in members]

    signature = _stat_signature(files)
    cached = cache_dir() / "manifests" / f"{signature}.json"
    if cached.exists():
        record = json.loads(cached.read_text())
        bad = [BadFile(**b) for b in record["bad"]]
        manifest = pd.DataFrame(record["manifest"])
    else:
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            results = list(
                _progress(pool.map(_inspect, (f[2] for f in files)), len(files), "validating", progress)
            )
        rows, bad = [], []
        for (rel, label, _), result in zip(files, results):
            if isinstance(result, str):
                bad.append(BadFile(rel, result))
            else:
                w, h, digest = result
                rows.append({"path": rel, "label": label, "width": w, "height": h, "sha256": digest})
        manifest = pd.DataFrame(rows, columns=["path", "label", "width", "height", "sha256"])
        record = {"manifest": manifest.to_dict(orient="list"), "bad": [b.__dict__ for b in bad]}
        with atomic_path(cached) as tmp:
            tmp.write_text(json.dumps(record))

    if bad and skip_bad:  # said where every command sees it, not only in `data info`
        print(f"covidlib: skipped {len(bad)} unusable file{'s' * (len(bad) > 1)} in {root} "
              f"(first: {bad[0].path}: {bad[0].reason})", file=sys.stderr)
    if bad and not skip_bad:
        first = bad[0]
        more = f" (and {len(bad) - 1} more bad files; --skip-bad skips them)" if len(bad) > 1 else " (--skip-bad skips it)"
        raise CovidlibError(f"{root / first.path}: {first.reason}{more}")
    manifest = manifest.sort_values("path", kind="stable").reset_index(drop=True)
    manifest["y"] = (manifest["label"] == POSITIVE_CLASS).astype(np.int64)
    for label in CLASS_NAMES:
        if not (manifest["label"] == label).any():
            raise CovidlibError(f"class folder {folders[label]} has no usable images")
    return Dataset(root=root, manifest=manifest, bad=bad)


def _progress(iterable: Iterable, total: int, desc: str, enabled: bool) -> Iterable:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="img", leave=False)


# --- decoding -------------------------------------------------------------------------


def to_gray_uint8(im: Image.Image) -> np.ndarray:
    """Any PIL image (1/L/P/LA/RGB/RGBA/16-bit/float) as a 2-D uint8 array."""
    if im.mode in {"I;16", "I;16L", "I;16B", "I;16N", "I"}:
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        return np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
    if im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        return np.rint((arr - lo) / (hi - lo or 1.0) * 255).astype(np.uint8)
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode != "L":
        im = im.convert("L")
    return np.asarray(im, dtype=np.uint8)


def resize(gray: np.ndarray, size: int, mode: str = "stretch") -> np.ndarray:
    """Resize a 2-D uint8 slice to ``size x size``.

    ``stretch`` is the paper's plain resize; ``pad`` keeps the aspect ratio and pads
    with black (air in a CT window) so that lung shapes are not distorted.
    """
    import cv2

    if mode not in RESIZE_MODES:
        raise CovidlibError(f"unknown resize mode {mode!r}; valid: {', '.join(RESIZE_MODES)}")
    h, w = gray.shape
    if mode == "pad":
        scale = size / max(h, w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        small = cv2.resize(gray, (nw, nh), interpolation=interp)
        out = np.zeros((size, size), np.uint8)
        top, left = (size - nh) // 2, (size - nw) // 2
        out[top : top + nh, left : left + nw] = small
        return out
    interp = cv2.INTER_AREA if size < min(h, w) else cv2.INTER_LINEAR
    return cv2.resize(gray, (size, size), interpolation=interp)


def read_image(path: str | os.PathLike, size: int | None = None, channels: int = 1,
               mode: str = "stretch") -> np.ndarray:
    """Decode one image to ``(H, W, channels)`` uint8, optionally resized to a square."""
    path = Path(path)
    if not path.exists():
        raise CovidlibError(f"image {path} does not exist")
    try:
        with Image.open(path) as im:
            im.load()
            gray = to_gray_uint8(im)
    except DECODE_ERRORS as exc:
        raise CovidlibError(f"{path}: cannot read image ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    if size is not None:
        gray = resize(gray, size, mode)
    return np.repeat(gray[..., None], channels, axis=-1) if channels != 1 else gray[..., None]


@dataclass
class DecodedImages:
    """All images of a dataset decoded at one size: uint8 ``(N, S, S, 1)``, memory-mapped."""

    images: np.ndarray
    labels: np.ndarray
    paths: list[str]
    key: str


def decoded(dataset: Dataset, size: int, mode: str = "stretch", progress: bool = False) -> DecodedImages:
    """Decode every image once per (manifest, size, resize mode) and keep it on disk.

    CT slices are grayscale, so the cache holds one channel (a third of the memory of
    RGB); backbones that want three channels repeat it inside the model.
    """
    if mode not in RESIZE_MODES:
        raise CovidlibError(f"unknown resize mode {mode!r}; valid: {', '.join(RESIZE_MODES)}")
    key = cache_key("decoded", 1, dataset.manifest_hash, size, 1, mode)
    folder = cache_dir() / "decoded" / key
    if not (folder / "meta.json").exists():
        paths = dataset.abs_paths()
        folder.parent.mkdir(parents=True, exist_ok=True)
        remove_orphans(folder.parent, ".tmp-*-pid*-*")
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-pid{os.getpid()}-", dir=folder.parent))
        try:
            out = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8,
                                            shape=(len(paths), size, size, 1))
            _reserve(tmp / "images.npy")

            def work(i: int) -> None:
                out[i] = read_image(paths[i], size, 1, mode)

            with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
                for _ in _progress(pool.map(work, range(len(paths))), len(paths), f"decoding at {size}px", progress):
                    pass
            out.flush()
            del out
            meta = {"paths": list(dataset.manifest["path"]), "labels": dataset.labels.tolist(),
                    "manifest_hash": dataset.manifest_hash, "size": size, "mode": mode}
            (tmp / "meta.json").write_text(json.dumps(meta))
            try:
                os.replace(tmp, folder)
            except OSError:  # another process finished first; theirs is as good as ours
                pass
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    meta = json.loads((folder / "meta.json").read_text())
    images = np.load(folder / "images.npy", mmap_mode="r")
    return DecodedImages(images=images, labels=np.asarray(meta["labels"], np.int64),
                         paths=meta["paths"], key=key)


def _reserve(path: Path) -> None:
    """Give the memory-mapped file its disk blocks now: on a full disk a write into a sparse
    memmap kills the process with SIGBUS, whereas fallocate fails with ENOSPC, a clean error."""
    size = path.stat().st_size
    try:
        with open(path, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, size)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise CovidlibError(f"no room in the cache folder {path.parent.parent} for {size / 2**20:.0f} MB of "
                                "decoded images; free some space or set COVIDLIB_CACHE elsewhere") from None
        if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
    except AttributeError:  # no posix_fallocate (macOS): keep the sparse file
        pass


def take(decoded_images: DecodedImages, paths: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels for the given relative paths, in that order (one uint8 copy)."""
    index = {p: i for i, p in enumerate(decoded_images.paths)}
    missing = [p for p in paths if p not in index]
    if missing:
        raise CovidlibError(f"split names {len(missing)} images not in the dataset, e.g. {missing[0]}")
    rows = np.fromiter((index[p] for p in paths), np.int64, len(paths))
    return np.asarray(decoded_images.images[rows]), decoded_images.labels[rows]


def tf_dataset(images: np.ndarray, labels: np.ndarray, *, batch_size: int, shuffle: bool = False,
               seed: int = 0, augment=None, target: str = "binary", reshuffle: bool = False):
    """A ``tf.data`` pipeline over uint8 arrays: shuffle, batch, cast, augment, prefetch.

    Floats are made per batch, never for the whole set. ``target`` is ``binary``
    (float 0/1), ``sparse`` (int) or ``onehot`` (2 columns), matching the loss.
    The shuffle order depends only on ``seed``, so resuming epoch k replays it exactly;
    ``reshuffle`` draws a new (seeded) order each pass instead, for one ``fit`` over many epochs.
    """
    from covidlib.runtime import tf

    tf = tf()
    ds = tf.data.Dataset.from_tensor_slices((images, labels))
    if shuffle:
        ds = ds.shuffle(len(labels), seed=seed, reshuffle_each_iteration=reshuffle)
    ds = ds.batch(batch_size)

    def prepare(x, y):
        x = tf.cast(x, tf.float32)
        if augment is not None:
            x = augment(x, training=True)
        if target == "binary":
            y = tf.cast(y, tf.float32)[:, None]
        elif target == "onehot":
            y = tf.one_hot(y, 2)
        return x, y

    return ds.map(prepare, num_parallel_calls=_map_calls(augment)).prefetch(tf.data.AUTOTUNE)


def _map_calls(augment):
    """Parallel map calls, except for random augmentation under op determinism: tf.data then
    runs the (stateful) map one batch at a time anyway, and a parallel request makes it rewrite
    the node and log a native ``E0000 ... use_unbounded_threadpool`` line every epoch (TF 2.21)."""
    from tensorflow.python.framework import config as tf_config  # no public getter

    from covidlib.runtime import tf

    return None if augment is not None and tf_config.is_op_determinism_enabled() else tf().data.AUTOTUNE


KAGGLE_DATASET = "plameneduardo/sarscov2-ctscan-dataset"


def fetch(dest: str | os.PathLike | None = None) -> Path:
    """Download the full dataset with kagglehub and return the folder holding the classes."""
    try:
        import kagglehub

        root = Path(kagglehub.dataset_download(KAGGLE_DATASET))
    except Exception as exc:  # kagglehub raises many kinds when offline
        reason = type(exc).__name__
        raise CovidlibError(
            f"could not download {KAGGLE_DATASET} from Kaggle ({reason}); download it by hand from "
            f"https://www.kaggle.com/datasets/{KAGGLE_DATASET}, unzip it, and pass --data DIR or set COVIDLIB_DATA"
        ) from None
    for candidate in [root, *sorted(p for p in root.rglob("*") if p.is_dir())]:
        try:
            _class_folders(candidate)
        except CovidlibError:
            continue
        if dest:
            shutil.copytree(candidate, Path(dest), dirs_exist_ok=True)
            return Path(dest)
        return candidate
    raise CovidlibError(f"downloaded {KAGGLE_DATASET} to {root} but found no COVID/non-COVID folders in it")


# UCSD-AI4H's COVID-CT (CT images cut from papers): an external test set, for evaluation only.
# Its README: "All copyrights of the data belong to the authors and publishers of these papers."
UCSD_REPOSITORY = "https://github.com/UCSD-AI4H/COVID-CT"
UCSD_ZIPS = {"CT_COVID": f"{UCSD_REPOSITORY}/raw/master/Images-processed/CT_COVID.zip",
             "CT_NonCOVID": f"{UCSD_REPOSITORY}/raw/master/Images-processed/CT_NonCOVID.zip"}


def fetch_ucsd(dest: str | os.PathLike | None = None, timeout: float = 60) -> Path:
    """Download UCSD's COVID-CT images into ``dest/CT_COVID`` and ``dest/CT_NonCOVID``.

    Both zips are unpacked into a temporary folder beside ``dest`` and moved into place only when
    complete, so an interrupted download leaves nothing half-written.
    """
    import urllib.request
    import zipfile

    dest = Path(dest) if dest else cache_dir() / "ucsd-covid-ct"
    if dest.exists() and any(dest.iterdir()):
        load_dataset(dest)  # one-line error when it is not a dataset
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".tmp-ucsd-") as tmp:
        for folder, url in UCSD_ZIPS.items():
            archive = Path(tmp) / f"{folder}.zip"
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response, open(archive, "wb") as out:
                    shutil.copyfileobj(response, out)
            except (OSError, ValueError) as exc:  # URLError is an OSError
                raise CovidlibError(f"could not download {url} ({type(exc).__name__}); download {UCSD_REPOSITORY} "
                                    "by hand and pass its Images-processed folders as --external DIR") from None
            target = Path(tmp) / "dataset" / folder
            target.mkdir(parents=True)
            with zipfile.ZipFile(archive) as z:
                for member in z.infolist():  # flattened to base names: no path from the archive is trusted
                    name = Path(member.filename).name
                    if member.is_dir() or "__MACOSX" in member.filename or name.startswith("."):
                        continue
                    if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                        (target / name).write_bytes(z.read(member))
        load_dataset(Path(tmp) / "dataset")
        shutil.rmtree(dest, ignore_errors=True)
        (Path(tmp) / "dataset").rename(dest)
    return dest
