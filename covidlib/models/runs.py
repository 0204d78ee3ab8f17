"""A run folder: its files, its identity, and one writer at a time.

This module is the only one that names a run's files. A run's identity is what decides its
numbers: the config (minus where things live), the split file, the data manifest, the seed
and the split kind. It is written when the run starts (``identity.json``) and in ``run.json``;
a resume with another identity is refused, so a folder never mixes two runs.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covidlib import CovidlibError
from covidlib.data.images import read_image
from covidlib.models import saved
from covidlib.models.config import RunConfig
from covidlib.models.contract import load_model
from covidlib.paths import atomic_path, read_json, write_text_atomic

# Settings that say where things are, not what is computed; the manifest and split hashes
# stand for the data and the split file.
_NOT_IDENTITY = ("preset", "data", "split", "out", "skip_bad")


@dataclass(frozen=True)
class RunFolder:
    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    # --- the files ------------------------------------------------------------------------
    @property
    def model_file(self) -> Path:
        return self.path / "model.keras"

    @property
    def model_recipe_file(self) -> Path:  # a frozen random backbone's draw, instead of model.keras
        return self.path / "model-recipe.json"

    @property
    def model_trained_file(self) -> Path:  # ... with the weights of the layers outside that backbone
        return self.path / "model-trained.npz"

    @property
    def history_file(self) -> Path:
        return self.path / "history.csv"

    @property
    def metrics_file(self) -> Path:  # written last: its presence marks a finished run
        return self.path / "metrics.json"

    @property
    def predictions_file(self) -> Path:
        return self.path / "predictions.csv"

    @property
    def split_file(self) -> Path:
        return self.path / "split.csv"

    @property
    def record_file(self) -> Path:
        return self.path / "run.json"

    @property
    def identity_file(self) -> Path:
        return self.path / "identity.json"

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoint"

    @property
    def state_file(self) -> Path:
        return self.checkpoint_dir / "state.json"

    @property
    def best_weights_file(self) -> Path:
        return self.checkpoint_dir / "best-weights.npz"

    def save_best(self, model) -> None:
        """The best epoch's layer weights only. Keras' save_weights also stores the optimizer's
        slots, three times the weights with Adam (measured: AlexNet at 227 px, 667 MB)."""
        with atomic_path(self.best_weights_file, suffix=".npz") as tmp:
            np.savez(tmp, *model.get_weights())

    def load_best(self, model) -> None:
        with np.load(self.best_weights_file) as z:
            model.set_weights([z[f"arr_{i}"] for i in range(len(z.files))])

    @property
    def explain_dir(self) -> Path:
        return self.path / "explain"

    @property
    def name(self) -> str:
        return self.path.name

    # --- reading a finished run -----------------------------------------------------------
    @property
    def finished(self) -> bool:
        return self.metrics_file.exists()

    def record(self) -> dict:
        """run.json; a finished run without one is damaged (one-line error)."""
        if not self.record_file.exists():
            raise CovidlibError(f"{self.record_file} is missing; the run folder is damaged")
        return read_json(self.record_file, "run record")

    def metrics(self) -> dict:
        return read_json(self.metrics_file, "metrics")

    def predictions(self) -> pd.DataFrame:
        """path, split, y, p_covid for the test (and validation) slices; checked."""
        if not self.finished or not self.predictions_file.exists():
            raise CovidlibError(f"{self.path} is not a finished covidlib run folder (no metrics.json / predictions.csv)")
        try:
            preds = pd.read_csv(self.predictions_file)
        except (OSError, ValueError) as exc:
            raise CovidlibError(f"{self.predictions_file}: cannot read it ({str(exc).splitlines()[0]})") from None
        missing = {"path", "y", "p_covid"} - set(preds.columns)
        if missing:
            raise CovidlibError(f"{self.predictions_file} lacks columns: {', '.join(sorted(missing))}; "
                                "the run folder is damaged")
        problem = _bad_predictions(preds)
        if problem:
            raise CovidlibError(f"{self.predictions_file}: {problem}; the run folder is damaged")
        return preds

    def history(self) -> pd.DataFrame:
        return pd.read_csv(self.history_file)

    def config(self) -> RunConfig:
        """The settings the run was trained with: the one reader of the config in ``run.json``."""
        return self.config_from(self.record())

    @staticmethod
    def config_from(record: dict) -> RunConfig:
        known = {f.name for f in dataclasses.fields(RunConfig)}
        return RunConfig(**{k: v for k, v in record["config"].items() if k in known})

    @property
    def data_root(self) -> Path:
        """The dataset the run was trained on."""
        return Path(self.record()["data"]["root"])

    def slices(self, paths: list[str], size: int | None = None) -> tuple[list[np.ndarray], int]:
        """Slices of the run's dataset as its model sees them (input size and resize mode), or at ``size``."""
        config = self.config()
        size = size or config.input_size
        return [read_image(self.data_root / p, size, 1, config.resize, lungs=config.lungs) for p in paths], size

    def units(self) -> pd.Series | None:
        """Test slice path -> its independent unit (the scan segment) when the run's split kept scans
        whole; None otherwise (a random split's slices have no unit the statistics could resample)."""
        if self.record().get("split", {}).get("kind") != "scan" or not self.split_file.exists():
            return None
        table = pd.read_csv(self.split_file)
        return table.set_index("path")["group"]

    def load_model(self):
        """The finished run's model: saved whole, or its random backbone drawn again (models/saved.py,
        which leaves TensorFlow's global seed set to the run's)."""
        if self.model_file.exists() or not self.model_recipe_file.exists():
            return load_model(self.model_file)
        made = read_json(self.model_recipe_file, "model recipe")
        try:
            with np.load(self.model_trained_file) as z:
                trained = {k: z[k] for k in z.files}
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CovidlibError(f"{self.model_trained_file} cannot be read ({reason}); the run folder is damaged") from None
        return saved.rebuild(made, trained, str(self.model_recipe_file))

    # --- identity -------------------------------------------------------------------------
    @staticmethod
    def identity(config, split_sha256: str, manifest_hash: str) -> dict[str, Any]:
        settings = {k: v for k, v in config.to_dict().items() if k not in _NOT_IDENTITY}
        if settings.get("lungs") == "whole":
            del settings["lungs"]  # runs from before the lung-masked experiment keep their identity
        return {"config_sha256": hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest(),
                "settings": settings, "split_sha256": split_sha256, "manifest_sha256": manifest_hash,
                "seed": config.seed, "split_kind": config.split_kind}

    def claim(self, identity: dict[str, Any]) -> None:
        """Record the identity of a new run, or refuse to resume one that was started differently."""
        if not self.identity_file.exists():
            write_text_atomic(self.identity_file, json.dumps(identity, indent=2, default=str))
            return
        started = read_json(self.identity_file, "run identity")
        if started.get("config_sha256") != identity["config_sha256"]:
            old, new = started.get("settings", {}), identity["settings"]
            key = next((k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)), "config")
            raise CovidlibError(f"run folder {self.path} was started with {key} = {old.get(key)!r}, not "
                                f"{new.get(key)!r}; resume it with the same settings or pass another --out")
        for key, what in (("split_sha256", "split file"), ("manifest_sha256", "data")):
            if started.get(key) != identity[key]:
                raise CovidlibError(f"run folder {self.path} was started on another {what}; "
                                    "resume it with the same one or pass another --out")

    # --- one writer -----------------------------------------------------------------------
    @property
    def lock_file(self) -> Path:
        """``.NAME.lock`` beside the folder as the file system names it: ``--out`` through a symlink
        or with ``..`` takes the same lock as the folder itself."""
        real = self.path.resolve()
        return real.with_name(f".{real.name}.lock")

    @contextmanager
    def writer(self) -> Iterator[None]:
        """Hold an exclusive lock while training into the folder; a second writer is refused.

        The lock file lies beside the folder, so taking it creates nothing inside a folder that a
        refused run must leave untouched; the OS releases it when the process ends, killed or not,
        and a writer that ends removes it (while still holding it). A run that stops before its
        first checkpoint has nothing to resume, so a folder this writer created is removed then.
        """
        if self.path.exists() and not self.path.is_dir():
            raise CovidlibError(f"--out {self.path} is a file, not a run folder")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = self._lock()
        created = not self.path.exists()
        try:
            yield
        except BaseException:
            if created and not self.state_file.exists():
                shutil.rmtree(self.path, ignore_errors=True)
            raise
        finally:
            self.lock_file.unlink(missing_ok=True)  # before unlocking: a waiter then finds its file gone
            handle.close()

    def _lock(self):
        """The lock file, open and locked. A writer removes its lock file as it ends, so a process that
        opened the old file before that and locked it afterwards holds a lock nobody else can see: it
        checks that the file it locked is still the one on disk, and takes the new one otherwise."""
        while True:
            handle = open(self.lock_file, "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                raise CovidlibError(f"run folder {self.path} is being written by another process; "
                                    "wait for it or pass another --out") from None
            try:
                if os.stat(self.lock_file).st_ino == os.fstat(handle.fileno()).st_ino:
                    return handle
            except FileNotFoundError:
                pass
            handle.close()

    def wait_for_writer(self, timeout: float = 60) -> None:
        """Wait until no process holds the folder's lock: a Dask worker that was lost mid-run leaves
        its notebook kernel behind for a moment (ipykernel exits within about a second of losing
        its parent), and the rescheduled run must not be refused as a second writer."""
        deadline = time.monotonic() + timeout
        try:
            handle = open(self.lock_file)  # never created here: only a writer makes (and removes) it
        except FileNotFoundError:
            return
        with handle:
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    return  # closing the file releases it
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        return  # the writer stays; train() refuses with one line
                    time.sleep(0.5)

    def write_results(self, model, history: pd.DataFrame, predictions: pd.DataFrame, record: dict,
                      metrics: dict) -> None:
        """Everything a finished run holds; metrics.json last, so a reader never sees half a run.

        The model is saved without the optimizer's state (Adam's two slots per weight, twice the
        weights again): a finished run is only ever predicted with; a resume reads the checkpoint.
        A frozen random backbone is saved as the recipe of its draw (models/saved.py)."""
        made = saved.recipe(model, self.config_from(record))
        if made is not None:
            with atomic_path(self.model_trained_file, suffix=".npz") as tmp:
                np.savez(tmp, **saved.trained_weights(model))
            write_text_atomic(self.model_recipe_file, json.dumps(made, indent=2))
            self.model_file.unlink(missing_ok=True)  # one form only: load_model prefers model.keras
        else:
            self._save_whole(model)
            self.model_recipe_file.unlink(missing_ok=True)
            self.model_trained_file.unlink(missing_ok=True)
        for table, path in ((history, self.history_file), (predictions, self.predictions_file)):
            with atomic_path(path, suffix=".csv") as tmp:  # a full disk names the file
                table.to_csv(tmp, index=False)
        write_text_atomic(self.record_file, json.dumps(record, indent=2, default=str))
        write_text_atomic(self.metrics_file, json.dumps(metrics, indent=2))
        shutil.rmtree(self.checkpoint_dir, ignore_errors=True)

    def _save_whole(self, model) -> None:
        optimizer = getattr(model, "optimizer", None)  # a frozen run's full model was never compiled
        if optimizer is not None:
            model.optimizer = None  # the .keras format ignores include_optimizer=False
        try:
            with atomic_path(self.model_file, suffix=".keras") as tmp:
                model.save(tmp)
        finally:
            if optimizer is not None:
                model.optimizer = optimizer


def _bad_predictions(preds: pd.DataFrame) -> str | None:
    """What is wrong with a predictions table (labels 0/1, P(COVID) a probability, a row at least), or None."""
    if preds.empty:
        return "holds no predictions (a header only)"
    y = pd.to_numeric(preds["y"], errors="coerce")
    p = pd.to_numeric(preds["p_covid"], errors="coerce")
    bad_y = ~y.isin([0, 1])
    if bad_y.any():
        return f"row {int(bad_y.idxmax()) + 2} has label y = {preds['y'][bad_y.idxmax()]}, not 0 or 1"
    bad_p = ~(np.isfinite(p) & (p >= 0) & (p <= 1))
    if bad_p.any():
        return f"row {int(bad_p.idxmax()) + 2} has p_covid = {preds['p_covid'][bad_p.idxmax()]}, not a probability in [0, 1]"
    return None


def finished_runs(folder: str | Path) -> list[RunFolder]:
    """The finished run folders directly inside ``folder``, by name."""
    folder = Path(folder)
    return [RunFolder(p.parent) for p in sorted(folder.glob("*/metrics.json"))] if folder.is_dir() else []
