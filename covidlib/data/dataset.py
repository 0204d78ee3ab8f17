"""Find a CT dataset on disk, validate it, fingerprint it, and decode it once into a cache.

The layout is the Kaggle one: a root folder with one folder per class (``COVID`` and
``non-COVID``, or any of the usual spellings). Labels are ``1 = COVID`` (the positive
class in every metric) and ``0 = non-COVID``; the paper used the opposite integers.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from covidlib import CovidlibError
from covidlib.paths import atomic_path, cache_dir, cache_key, printable
from covidlib.vocabulary import CLASS_NAMES, POSITIVE_CLASS

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
MIN_SIDE = 16

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
    ignored: list[str] = []
    for child in sorted(root.iterdir()):
        if not child.is_dir():
            continue
        name = canonical_class(child.name)
        if name is None:
            ignored += [child.name] if not child.name.startswith(".") else []  # not .ipynb_checkpoints and the like
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
    if ignored:  # said once the folder is usable, so an error stays the only line
        print(printable(f"covidlib: warning: {root}: ignored {', '.join(ignored)} (not a COVID or non-COVID class "
                        "folder), and the files in it"), file=sys.stderr)
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
        print(printable(f"covidlib: skipped {len(bad)} unusable file{'s' * (len(bad) > 1)} in {root} "
                        f"(first: {bad[0].path}: {bad[0].reason})"), file=sys.stderr)
    if bad and not skip_bad:
        first = bad[0]
        more = f" (and {len(bad) - 1} more bad files; --skip-bad skips them)" if len(bad) > 1 else " (--skip-bad skips it)"
        raise CovidlibError(f"{root / first.path}: {first.reason}{more}")
    manifest = manifest.sort_values("path", kind="stable").reset_index(drop=True)
    _refuse_cross_class_copies(root, manifest)
    manifest["y"] = (manifest["label"] == POSITIVE_CLASS).astype(np.int64)
    for label in CLASS_NAMES:
        if not (manifest["label"] == label).any():
            raise CovidlibError(f"class folder {folders[label]} has no usable images")
    return Dataset(root=root, manifest=manifest, bad=bad)


def _refuse_cross_class_copies(root: Path, manifest: pd.DataFrame) -> None:
    """One image under both labels has no true label, and it would sit on both sides of a split."""
    labels = manifest.groupby("sha256")["label"].nunique()
    both = labels[labels > 1]
    if len(both):
        same = manifest[manifest["sha256"] == both.index[0]].drop_duplicates("label")["path"]
        more = f" ({len(both) - 1} more such images)" if len(both) > 1 else ""
        raise CovidlibError(f"{root / same.iloc[0]} and {root / same.iloc[1]} are the same image (byte-identical) "
                            f"in both class folders{more}; keep it in one class only")


def _progress(iterable: Iterable, total: int, desc: str, enabled: bool) -> Iterable:
    if not enabled:
        return iterable

    return tqdm(iterable, total=total, desc=desc, unit="img", leave=False)


# --- decoding -------------------------------------------------------------------------

