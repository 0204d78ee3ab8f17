"""A study folder: the only place that knows its layout and how its runs are named.

::

    STUDY/
      split-random.csv (.json)         one split file per kind, shared by every run
      split-random-seed43.csv          an extra training seed's split (same test slices)
      runs/ARCH-KIND[-seedN]/          one run folder per architecture, split and extra seed
      notebooks/train_ARCH-KIND.ipynb  the executed training notebooks; REPORT.ipynb for the reports
      status.json                      each run's and report notebook's outcome and seconds
      book/                            the book staged and built from the executed notebooks

A run of the study's own seed is ``ARCH-KIND``; a run of an extra seed ``ARCH-KIND-seedN``.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from covidlib import CovidlibError
from covidlib.models.architectures import ARCHITECTURES
from covidlib.models.runs import RunFolder, finished_runs
from covidlib.paths import write_text_atomic
from covidlib.vocabulary import SPLIT_KINDS

_SEED_SUFFIX = "-seed"
_RUN_NAME = re.compile(r"^(?P<arch>[a-z0-9_]+)-(?P<kind>[a-z]+)(?:-seed(?P<seed>\d+))?$")
TRAIN_PREFIX = "train_"
_STATUS_LOCK = threading.Lock()  # status.json: read, change, write back


@dataclass(frozen=True)
class RunName:
    """``densenet201-scan`` or ``vgg16-random-seed43``: a run's architecture, split kind and, for
    an extra training seed, that seed (None for the study's own seed)."""

    arch: str
    kind: str
    seed: int | None = None

    def __str__(self) -> str:
        return f"{self.arch}-{self.kind}" + (f"{_SEED_SUFFIX}{self.seed}" if self.seed is not None else "")

    @classmethod
    def parse(cls, name: str) -> RunName | None:
        m = _RUN_NAME.match(name)
        if m is None:
            return None
        return cls(m["arch"], m["kind"], int(m["seed"]) if m["seed"] else None)

    @property
    def title(self) -> str:
        """``DenseNet201, scan split``; ``VGG16, random split, seed 43``."""
        arch = ARCHITECTURES[self.arch].title if self.arch in ARCHITECTURES else self.arch
        return f"{arch}, {self.kind} split" + (f", seed {self.seed}" if self.seed is not None else "")


# The validity notebook's experiments that retrain the Basic CNN: cross-validation over scans,
# the lung-masked views, the coarseness sweep (appendix).
EXPERIMENTS = ("scan-cv", "lung-masked", "sweep")


@dataclass(frozen=True)
class StudyFolder:
    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    # --- the layout -----------------------------------------------------------------------
    @property
    def runs_dir(self) -> Path:
        return self.path / "runs"

    @property
    def notebooks_dir(self) -> Path:
        return self.path / "notebooks"

    @property
    def status_file(self) -> Path:
        return self.path / "status.json"

    @property
    def book_dir(self) -> Path:
        return self.path / "book"

    def experiment_dir(self, experiment: str) -> Path:
        """Where the validity notebook keeps one experiment's split files and retrained runs."""
        if experiment not in EXPERIMENTS:
            raise ValueError(f"unknown experiment {experiment!r}; valid: {', '.join(EXPERIMENTS)}")
        return self.path / experiment

    def split_file(self, kind: str, seed: int | None = None) -> Path:
        """The split file of ``kind``; with ``seed``, an extra training seed's random split."""
        return self.path / f"split-{kind}{_SEED_SUFFIX}{seed}.csv" if seed is not None else self.path / f"split-{kind}.csv"

    def run(self, name: RunName | str) -> RunFolder:
        return RunFolder(self.runs_dir / str(name))

    def training_notebook(self, name: RunName | str) -> Path:
        return self.notebooks_dir / f"{TRAIN_PREFIX}{name}.ipynb"

    def report_notebook(self, report: str) -> Path:
        return self.notebooks_dir / f"{report}.ipynb"

    @staticmethod
    def notebook_title(notebook: Path) -> str | None:
        """A training notebook's run title (``DenseNet201, scan split``); None for a report."""
        if not notebook.stem.startswith(TRAIN_PREFIX):
            return None
        name = RunName.parse(notebook.stem.removeprefix(TRAIN_PREFIX))
        return name.title if name else None

    def refuse_foreign(self) -> None:
        """A study's ``--out`` is a study folder, an empty folder or a new one: a study written into a
        run folder or any other non-empty folder would mix with what is there. Checked before writing."""
        if not self.path.exists():
            return
        if not self.path.is_dir():
            raise CovidlibError(f"--out {self.path} is a file, not a study folder")
        if (not any(self.path.iterdir()) or self.runs_dir.is_dir() or self.status_file.exists()
                or any(self.path.glob("split-*.csv"))):
            return
        raise CovidlibError(f"--out {self.path} is not empty and not a study folder (it has no runs/, status.json "
                            "or split-*.csv); pass a new or empty folder")

    # --- its runs -------------------------------------------------------------------------
    def runs(self, split_kind: str | None = None, *, seeds: bool = False) -> dict[str, Path]:
        """Run name -> folder of every finished run, by name; of one split kind if given.

        Only Table 1 reads the extra seeds' runs (``seeds=True``); every other figure, test and
        gallery compares one run per architecture, the study's own seed's.
        """
        out = {}
        for run in finished_runs(self.runs_dir):
            name = RunName.parse(run.name)
            if split_kind and run.record().get("split", {}).get("kind") != split_kind:
                continue
            if not seeds and name is not None and name.seed is not None:
                continue
            out[run.name] = run.path
        return out

    def models(self, split_kind: str) -> dict[str, Path]:
        """Architecture -> folder of the study's own seed's finished run on one split."""
        return {RunName.parse(k).arch if RunName.parse(k) else k: v for k, v in self.runs(split_kind).items()}

    def main_split(self) -> str:
        """The split a report shows: the paper's random split, else the next kind a study ran."""
        for kind in SPLIT_KINDS:
            if self.runs(kind):
                return kind
        raise CovidlibError(f"{self.path} holds no finished runs")

    def data_root(self) -> Path:
        """The dataset the study's runs were trained on (from the first run's record)."""
        runs = self.runs()
        if not runs:
            raise CovidlibError(f"{self.path} holds no finished runs")
        return Path(RunFolder(next(iter(runs.values()))).record()["data"]["root"])

    def split_facts(self) -> pd.DataFrame:
        """Per split kind: test slices, the independent units among them (scan segments on a scan split),
        and how many have a near-duplicate, or a same-class scan neighbour (+-1, +-3 file numbers),
        among the training and validation slices."""
        rows = {}
        for path in sorted(self.path.glob("split-*.json")):
            info = json.loads(path.read_text())
            if _SEED_SUFFIX in path.stem:
                continue  # an extra seed's split has the same test slices as its kind's
            nd, scan = info["near_duplicates"], info.get("scan_neighbours") or {}
            table = pd.read_csv(path.with_suffix(".csv"))
            rows[info["kind"]] = {"test images": nd["test_images"],
                                  "test units": int(table.loc[table["split"] == "test", "group"].nunique()),
                                  "with a near-duplicate in train": nd["with_train_near_duplicate"],
                                  "fraction": nd["fraction"], "threshold (bits)": nd["threshold"],
                                  **{f"with a scan neighbour within {r}": scan.get(f"within_{r}") for r in (1, 3)},
                                  **{f"scan fraction within {r}": scan.get(f"fraction_within_{r}") for r in (1, 3)}}
        return pd.DataFrame.from_dict(rows, orient="index")

    # --- status.json ----------------------------------------------------------------------
    def status(self) -> dict:
        """Each run's and report notebook's outcome and seconds ({} before the first)."""
        return json.loads(self.status_file.read_text()) if self.status_file.exists() else {}

    def set_status(self, key: str, **fields) -> None:
        """Record one outcome; a new outcome replaces the old one's fields (no stale error after a rerun).
        Report notebooks finish in threads side by side: one writer at a time, or one outcome is lost."""
        with _STATUS_LOCK:
            data = self.status()
            data[key] = {k: v for k, v in fields.items() if v is not None}
            write_text_atomic(self.status_file, json.dumps(data, indent=2))

    def clear_status(self) -> None:
        self.status_file.unlink(missing_ok=True)

    def failures(self) -> list[str]:
        return [k for k, v in self.status().items() if v.get("status") == "failed"]

    def status_table(self) -> pd.DataFrame:
        return pd.DataFrame(self.status()).T
