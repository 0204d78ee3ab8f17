"""``train(config) -> run folder``: resumable, deterministic training of one architecture.

A run folder holds everything needed to evaluate or explain the model later without
retraining: ``model.keras`` (or a random backbone's recipe, models/saved.py), ``history.csv``, ``metrics.json``, ``predictions.csv``
(test split), ``split.csv``, and ``run.json`` (config, versions, data manifest hash,
split hash, wall time, images per second).

Each epoch ends with a checkpoint (model + optimizer + early-stopping state) written
atomically; ``resume=True`` continues a killed run from its last finished epoch. The
shuffle order of epoch k depends only on (seed, k), so a resumed run replays exactly
what the uninterrupted one would have done.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covidlib import CovidlibError, runtime
from covidlib.data.dataset import load_dataset
from covidlib.data.images import decoded, take, tf_dataset
from covidlib.data.splits import Split, file_hash, load_split, make_split
from covidlib.metrics import binary_metrics
from covidlib.models.architectures import build_model
from covidlib.models.config import RunConfig
from covidlib.models.contract import (
    backbone,
    feature_model,
    feature_norm,
    head_model,
    load_model,
    loss_and_target,
    predict_covid,
    redraw_head,
    reseed_random_layers,
    unfreeze_top,
)
from covidlib.models.runs import RunFolder
from covidlib.paths import atomic_path, cache_dir, cache_key, data_dir, read_json, shown, write_text_atomic
from covidlib.runtime import apply_policy, device_policy, tf, versions

# Tests set this to kill the process with SIGKILL right after epoch N's checkpoint.
_FAULT_ENV = "COVIDLIB_FAULT_AFTER_EPOCH"


def default_run_dir(config: RunConfig) -> Path:
    return Path("runs") / f"{config.arch}-{config.mode}-{config.split_kind}-seed{config.seed}"


def split_used(split: Split, config: RunConfig) -> pd.DataFrame:
    """The rows of ``split`` that a run of ``config`` trains, validates and tests on: all of them, or
    a smoke preset's stratified subsample (by part and label), the same for every training seed."""
    table, n = split.table, config.max_images
    if not n or n >= len(table):
        return table
    frac = n / len(table)
    parts = [g.sample(n=max(2, round(len(g) * frac)), random_state=0) for _, g in table.groupby(["split", "label"])]
    return pd.concat(parts).sort_values("path").reset_index(drop=True)


def _prepare_split(config: RunConfig, dataset) -> Split:
    """The run's split, checked; saved by the caller once the run folder may be created."""
    if config.split:
        split = load_split(config.split, dataset)
    else:
        split = make_split(dataset, config.split_kind, seed=config.seed)
    split.table = split_used(split, config)
    for part in ("train", "test"):
        labels = set(split.table.loc[split.table["split"] == part, "label"])
        if len(labels) < 2:
            raise CovidlibError(f"the {part} split of {config.split or 'the new split'} holds "
                                f"{'only ' + labels.pop() if labels else 'no'} images; it needs both classes")
    return split


def _run_split(config: RunConfig, dataset, run: RunFolder, resume: bool) -> Split:
    """A new run's split; a resumed run's own (``split.csv``), refused if ``--split`` names another."""
    if not (resume and run.split_file.exists()):
        return _prepare_split(config, dataset)
    started = load_split(run.split_file, dataset)
    if config.split:
        rows = [set(zip(s.table["path"], s.table["split"])) for s in (started, _prepare_split(config, dataset))]
        if rows[0] != rows[1]:
            raise CovidlibError(f"run folder {run.path} was started on another split than --split {config.split}; "
                                "resume it with the same one or pass another --out")
    return started


def _diverged(row: dict) -> None:
    """A loss that is NaN or infinite ends the run: every later epoch and prediction would be NaN too."""
    for key in ("loss", "val_loss"):
        if key in row and not np.isfinite(row[key]):
            raise CovidlibError(f"training stopped at epoch {row['epoch']}: the {key.replace('_', ' ')} became "
                                f"{row[key]} (try a lower --learning-rate)")


def _compile(model, learning_rate: float, loss, policy: dict) -> None:
    keras = runtime.keras()

    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=loss, metrics=["accuracy"],
                  jit_compile=policy["jit_compile"])  # see runtime.device_policy


def _features(model, config: RunConfig, dataset, images_all: np.ndarray) -> tuple[np.ndarray, float]:
    """Pooled backbone features of every image, computed once and cached on disk.

    Keyed by architecture, weights, input size, resize mode, lung view and data; with random
    weights the seed decides the backbone, so it is part of the key too. Also returns
    the backbone pass's images per second (kept beside the cache), which is the
    frozen model's inference speed: the head adds one matrix-vector product.
    """

    weights_id = config.weights if config.weights in ("none", "imagenet") else file_hash(config.weights)[:12]
    seed = config.backbone_draw if config.weights == "none" else None
    view = () if config.lungs == "whole" else (config.lungs,)  # whole slices keep the key they always had
    key = cache_key("features", 1, config.arch, weights_id, seed, config.input_size, config.resize, dataset.manifest_hash,
                    *view)
    target = cache_dir() / "features" / f"{key}.npy"
    timing = target.with_suffix(".json")
    if target.exists() and timing.exists():
        return np.load(target), float(json.loads(timing.read_text())["images_per_second"])
    extractor = feature_model(model)
    t0 = time.perf_counter()
    feats = extractor.predict(_batches(images_all, config.batch_size), verbose=_verbose())
    speed = len(images_all) / max(time.perf_counter() - t0, 1e-9)
    with atomic_path(target, suffix=".npy") as tmp:
        np.save(tmp, feats.astype(np.float32))
    write_text_atomic(timing, json.dumps({"images": len(images_all), "images_per_second": round(speed, 2)}))
    return feats, speed


def _batches(images: np.ndarray, batch_size: int):

    ds = tf().data.Dataset.from_tensor_slices(images).batch(batch_size)
    return ds.map(lambda x: tf().cast(x, tf().float32)).prefetch(2)


def _verbose() -> int:
    """Keras' progress bars in a terminal; elsewhere (a notebook, a log) our own sparse lines."""
    return 1 if sys.stdout.isatty() else 0


def _report_epoch(row: dict, state: _State, epochs: int) -> None:
    """Off a terminal, one line for the first epoch, every tenth and the last: a 150-epoch run
    is 16 lines on a book page, and the learning curves hold every epoch."""
    if sys.stdout.isatty() or not (row["epoch"] == 1 or row["epoch"] % 10 == 0 or state.stopped
                                   or row["epoch"] == epochs):
        return
    values = ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k not in ("epoch", "seconds"))
    stop = f"; early stop, best epoch {state.best_epoch}" if state.stopped else ""
    print(f"epoch {row['epoch']}/{epochs}: {values} ({row['seconds']:.1f} s){stop}", flush=True)


@dataclass
class _State:
    """Early stopping and progress that survive a restart (``checkpoint/state.json``)."""

    epoch: int = 0
    best: float = float("inf")
    best_epoch: int = -1
    wait: int = 0
    history: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    checkpoint: str | None = None
    stopped: bool = False

    @classmethod
    def load(cls, path: Path) -> _State:
        if not path.exists():
            return cls()
        try:
            return cls(**read_json(path, "checkpoint state"))
        except TypeError:
            raise CovidlibError(f"{path}: the checkpoint state is damaged (unexpected fields)") from None

    def save(self, path: Path) -> None:
        write_text_atomic(path, json.dumps(asdict(self)))


def _improved(state: _State, row: dict, has_val: bool, patience: int) -> bool:
    """Early stopping on validation loss (training loss without a validation split)."""
    monitored = row.get("val_loss", row["loss"])
    if monitored < state.best - 1e-4:
        state.best, state.best_epoch, state.wait = monitored, row["epoch"], 0
        return True
    state.wait += 1
    state.stopped = has_val and state.wait >= patience
    return False


def _fit_head(head, make, val_ds, config: RunConfig, state: _State, run: RunFolder) -> None:
    """A frozen run's head in one ``fit``: an epoch over cached features costs ~0.1-0.2 s on
    2 cores, mostly Keras overhead, so a ``fit`` call and a checkpoint per epoch would cost
    more than the training itself. A restart simply retrains the head."""
    keras = runtime.keras()

    has_val = val_ds is not None

    class Track(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            seconds = time.perf_counter() - self.t0
            row = {"epoch": epoch + 1, **{k: float(v) for k, v in (logs or {}).items()}, "seconds": round(seconds, 5)}
            _diverged(row)
            state.history.append(row)
            state.train_seconds += seconds
            state.epoch = epoch + 1
            if _improved(state, row, has_val, config.patience):
                run.save_best(head)
            self.model.stop_training = state.stopped

    train_ds = make("train", True)
    head.fit(train_ds, validation_data=val_ds, epochs=config.epochs, callbacks=[Track()], shuffle=False, verbose=0)


def _fit_epochs(trainee, model, make, val_ds, config: RunConfig, state: _State, run: RunFolder, loss,
                augment, strategy, policy: dict) -> None:
    """One ``fit`` per epoch with a checkpoint after each, so a killed run resumes where it stopped."""
    has_val = val_ds is not None

    fault = int(os.environ.get(_FAULT_ENV, "-1"))
    for epoch in range(state.epoch, config.epochs):
        if state.stopped:
            break
        reseed_random_layers([trainee, *([augment] if augment is not None else [])], config.seed, epoch)
        if config.mode == "finetune" and epoch == config.warmup_epochs:
            n = unfreeze_top(model, config.unfreeze_fraction)
            print(f"fine-tuning: {n} backbone layers unfrozen at lr {config.finetune_learning_rate}", file=sys.stderr)
            with strategy.scope():
                _compile(trainee, config.finetune_learning_rate, loss, policy)
        t0 = time.perf_counter()
        h = trainee.fit(make("train", True, epoch), validation_data=val_ds, initial_epoch=epoch, epochs=epoch + 1,
                        shuffle=False,  # tf_dataset already shuffled, by (seed, epoch)
                        verbose=_verbose())
        seconds = time.perf_counter() - t0
        row = {"epoch": epoch + 1, **{k: float(v[-1]) for k, v in h.history.items()}, "seconds": round(seconds, 3)}
        _diverged(row)  # before its checkpoint: a resume starts from the last finite epoch
        state.history.append(row)
        state.train_seconds += seconds
        if _improved(state, row, has_val, config.patience):
            run.save_best(trainee)
        _report_epoch(row, state, config.epochs)
        # The model file carries its epoch in its name, so state.json (written last) never
        # points at a checkpoint newer or older than the state it describes.
        name = f"epoch-{epoch + 1:04d}.keras"
        with atomic_path(run.checkpoint_dir / name, suffix=".keras") as tmp:
            trainee.save(tmp)
        previous, state.checkpoint, state.epoch = state.checkpoint, name, epoch + 1
        state.save(run.state_file)
        if previous and previous != name:
            (run.checkpoint_dir / previous).unlink(missing_ok=True)
        if epoch + 1 == fault:
            os.kill(os.getpid(), signal.SIGKILL)


def train(config: RunConfig, *, resume: bool = False, run_dir: str | Path | None = None) -> Path:
    """Train one architecture; return its run folder. One process at a time per run folder."""
    run = RunFolder(run_dir or config.out or default_run_dir(config))
    with run.writer():
        return _train(config, resume, run)


def _train(config: RunConfig, resume: bool, run: RunFolder) -> Path:
    """Short orchestration: data, model and split; identity; inputs; fit; predictions; the run folder."""

    if not resume and run.path.exists() and any(run.path.iterdir()):
        raise CovidlibError(f"run folder {run.path} already exists; pass --resume to continue it or --out elsewhere")
    wall0 = time.perf_counter()
    # Everything that can fail on bad input (data, split, weights, options) fails before the
    # run folder is created, so a refused run leaves nothing behind.
    dataset = load_dataset(data_dir(config.data), skip_bad=config.skip_bad, progress=sys.stderr.isatty())
    split = _run_split(config, dataset, run, resume)
    # the split file decides the kind (a study passes its scan split with the default split_kind)
    config = dataclasses.replace(config, split_kind=split.info.get("kind", config.split_kind))
    if resume and run.finished:  # finished earlier: nothing to do, if it is this run
        run.claim(RunFolder.identity(config, file_hash(run.split_file), dataset.manifest_hash))
        return run.path
    policy = device_policy(config.deterministic, config.mixed_precision)
    strategy = apply_policy(policy, config.backbone_draw if config.random_backbone else config.seed)
    with strategy.scope():
        model = build_model(config.arch, input_size=config.input_size, weights=config.weights, mode=config.mode,
                            loss=config.loss, dropout=config.dropout)
        if config.random_backbone and config.backbone_draw != config.seed:  # the backbone is the study's,
            redraw_head(model, config.seed)  # the head this seed's
    run.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    if not run.split_file.exists():
        split.save(run.split_file)
    run.claim(RunFolder.identity(config, file_hash(run.split_file), dataset.manifest_hash))

    job = _inputs(config, model, dataset, split)
    state = _fit(job, config, run, resume, strategy, policy)
    p = {part: job.predict(part) for part in job.parts if len(job.parts[part][1])}
    metrics = binary_metrics(job.parts["test"][1], p["test"])
    frames = [pd.DataFrame({"path": split.paths(part), "split": part, "y": job.parts[part][1], "p_covid": p[part]})
              for part in ("test", "val") if part in p]  # val: thresholds and calibration never touch test
    record = _record(config, dataset, split, run, job, state, wall0, policy)
    run.write_results(job.model, pd.DataFrame(state.history), pd.concat(frames, ignore_index=True), record, metrics)
    print(f"{config.arch}: test accuracy {metrics['accuracy']:.4f}, AUC {metrics['auc']:.4f} "
          f"({len(p['test'])} test images, {state.epoch} epochs, {record['train_seconds']:.0f} s training) -> {shown(run.path)}")
    return run.path


@dataclass
class _Job:
    """What one run trains on and with: the full model, the part that trains (the head alone for a
    frozen run), the inputs of each split (images, or cached features), and the loss."""

    model: Any
    trainee: Any
    parts: dict[str, tuple[np.ndarray, np.ndarray]]
    inputs: dict[str, tuple[np.ndarray, np.ndarray]]
    loss: Any
    target: str
    frozen: bool
    batch_size: int
    inference_speed: float | None = None  # a frozen run's backbone pass, measured with the features

    def predict(self, part: str) -> np.ndarray:
        """P(COVID). Frozen runs: the trained head over the cached features is the full model's
        output (tests check it), without a second backbone pass over val and test."""
        t0 = time.perf_counter()
        out = predict_covid(self.trainee if self.frozen else self.model, self.inputs[part][0])
        if part == "test" and not self.frozen:
            self.inference_speed = len(out) / max(time.perf_counter() - t0, 1e-9)
        return out


def _inputs(config: RunConfig, model, dataset, split: Split) -> _Job:

    cache = decoded(dataset, config.input_size, config.resize, progress=sys.stderr.isatty(), lungs=config.lungs)
    parts = {p: take(cache, split.paths(p)) for p in ("train", "val", "test")}
    loss, target = loss_and_target(config.loss)
    job = _Job(model, model, parts, parts, loss, target, config.mode == "frozen", config.batch_size)
    if job.frozen:  # train only the head, on backbone features computed once and cached
        index = {p: i for i, p in enumerate(cache.paths)}
        feats, job.inference_speed = _features(model, config, dataset, np.asarray(cache.images))
        job.inputs = {p: (feats[[index[q] for q in split.paths(p)]], parts[p][1]) for p in parts}
        job.trainee = head_model(model, feats.shape[1])
        feature_norm(job.trainee).adapt(job.inputs["train"][0])
    return job


def _augmenter(config: RunConfig):
    keras = runtime.keras()

    if not config.augment or config.mode == "frozen":
        return None
    return keras.Sequential([keras.layers.RandomFlip("horizontal", seed=config.seed),
                             keras.layers.RandomRotation(0.05, seed=config.seed),
                             keras.layers.RandomZoom(0.1, seed=config.seed)], name="augment")


def _fit(job: _Job, config: RunConfig, run: RunFolder, resume: bool, strategy, policy: dict) -> _State:
    """Restore the last checkpoint or compile afresh, train, and keep the best epoch's weights."""

    state = _State.load(run.state_file)
    with strategy.scope():  # everything that builds, compiles or restores a model
        if resume and state.checkpoint:
            job.trainee = load_model(run.checkpoint_dir / state.checkpoint, compile=True)
            if not job.frozen:
                job.model = job.trainee
            print(f"resuming {config.arch} from epoch {state.epoch}", file=sys.stderr)
        else:
            if config.mode == "finetune":
                backbone(job.model).trainable = False
            _compile(job.trainee, config.learning_rate, job.loss, policy)
    augment = _augmenter(config)

    def make(part: str, shuffle: bool, epoch: int = 0):
        x, y = job.inputs[part]
        return tf_dataset(x, y, batch_size=config.batch_size, shuffle=shuffle, seed=config.seed * 1000 + epoch,
                          augment=augment if shuffle else None, target=job.target, reshuffle=job.frozen)

    has_val = len(job.parts["val"][1]) > 0
    val_ds = make("val", False) if has_val else None
    if job.frozen:
        _fit_head(job.trainee, make, val_ds, config, state, run)
    else:
        _fit_epochs(job.trainee, job.model, make, val_ds, config, state, run, job.loss, augment, strategy, policy)
    if state.best_epoch > 0 and has_val:  # a frozen run's head shares its layers with the full model
        run.load_best(job.trainee)
    return state


def _record(config: RunConfig, dataset, split: Split, run: RunFolder, job: _Job, state: _State,
            wall0: float, policy: dict) -> dict[str, Any]:
    """run.json: the config, versions, device policy, data and split facts, and what the run cost."""

    n_train = len(job.parts["train"][1])
    return {
        "config": config.to_dict(),
        "identity": RunFolder.identity(config, file_hash(run.split_file), dataset.manifest_hash),
        "versions": versions(),
        "device": policy,
        "data": {"root": str(dataset.root), "manifest_hash": dataset.manifest_hash, "images": len(dataset.manifest),
                 "counts": dataset.counts(), "skipped": [asdict(b) for b in dataset.bad],
                 "size_quartiles": {k: [float(v) for v in np.percentile(dataset.manifest[k], [0, 25, 50, 75, 100])]
                                    for k in ("width", "height")}},
        "split": {"sha256": file_hash(run.split_file), **{k: v for k, v in split.info.items() if k != "sha256"},
                  "sizes": {p: int(len(job.parts[p][1])) for p in job.parts}},
        "epochs_run": state.epoch,
        "best_epoch": state.best_epoch,
        "parameters": int(job.model.count_params()),
        "train_seconds": round(state.train_seconds, 2),
        "train_images_per_second": round(n_train * state.epoch / max(state.train_seconds, 1e-9), 1),
        "inference_images_per_second": round(job.inference_speed or 0.0, 1),
        "wall_seconds_this_process": round(time.perf_counter() - wall0, 2),
    }
