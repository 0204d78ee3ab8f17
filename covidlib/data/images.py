"""Decode slices to grey uint8 at one size, once per dataset, into a memory-mapped cache; feed them to tf.data."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from covidlib import CovidlibError, runtime
from covidlib.data.dataset import DECODE_ERRORS, Dataset, _progress
from covidlib.data.lungs import LUNG_VIEWS, lung_view
from covidlib.paths import cache_dir, cache_key, remove_orphans

RESIZE_MODES = ("stretch", "pad")

# Truncated PNGs must fail loudly, not decode into grey padding.



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
               mode: str = "stretch", min_side: int = 0, lungs: str = "whole") -> np.ndarray:
    """Decode one image to ``(H, W, channels)`` uint8, optionally resized to a square; an image with a
    side under ``min_side`` is refused (a dataset's own images were checked against MIN_SIDE).
    ``lungs`` masks it first, at full resolution (:func:`covidlib.data.lungs.lung_view`)."""
    path = Path(path)
    if not path.exists():
        raise CovidlibError(f"image {path} does not exist")
    try:
        with Image.open(path) as im:
            im.load()
            gray = to_gray_uint8(im)
    except DECODE_ERRORS as exc:
        raise CovidlibError(f"{path}: cannot read image ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    if min(gray.shape[:2]) < min_side:
        raise CovidlibError(f"{path}: image is {gray.shape[1]}x{gray.shape[0]}, smaller than {min_side} px a side")
    gray = lung_view(gray, lungs)
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


def decoded(dataset: Dataset, size: int, mode: str = "stretch", progress: bool = False,
            lungs: str = "whole") -> DecodedImages:
    """Decode every image once per (manifest, size, resize mode, lung view) and keep it on disk.
    CT slices are grayscale, so the cache holds one channel (a third of the memory of
    RGB); backbones that want three channels repeat it inside the model.
    """
    if mode not in RESIZE_MODES:
        raise CovidlibError(f"unknown resize mode {mode!r}; valid: {', '.join(RESIZE_MODES)}")
    if lungs not in LUNG_VIEWS:
        raise CovidlibError(f"unknown lung view {lungs!r}; valid: {', '.join(LUNG_VIEWS)}")
    view = () if lungs == "whole" else (lungs,)  # the whole slice keeps the cache key it always had
    key = cache_key("decoded", 1, dataset.manifest_hash, size, 1, mode, *view)
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
                out[i] = read_image(paths[i], size, 1, mode, lungs=lungs)

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
    tf = runtime.tf()
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

    return None if augment is not None and tf_config.is_op_determinism_enabled() else runtime.tf().data.AUTOTUNE

