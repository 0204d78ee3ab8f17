"""Download the datasets for users with a network: the paper's (Kaggle, kagglehub) and UCSD's external test set."""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.request
import zipfile
from pathlib import Path

from covidlib import CovidlibError
from covidlib.data.dataset import IMAGE_SUFFIXES, _class_folders, load_dataset
from covidlib.paths import cache_dir

# Truncated PNGs must fail loudly, not decode into grey padding.

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
