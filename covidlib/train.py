"""``train(config) -> run folder``: resumable, deterministic training of one architecture.

A run folder holds everything needed to evaluate or explain the model later without
retraining: ``model.keras``, ``history.csv``, ``metrics.json``, ``predictions.csv``
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
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covidlib import CovidlibError
from covidlib.config import RunConfig
from covidlib.data import decoded, load_dataset, take, tf_dataset
from covidlib.paths import atomic_path, cache_dir, data_dir, read_json, write_text_atomic
from covidlib.splits import Split, file_hash, load_split, make_split

CHECKPOINT = "checkpoint"
# Tests set this to kill the process with SIGKILL right after epoch N's checkpoint.
_FAULT_ENV = "COVIDLIB_FAULT_AFTER_EPOCH"


def default_run_dir(config: RunConfig) -> Path:
    return Path("runs") / f"{config.arch}-{config.mode}-{config.split_kind}-seed{config.seed}"


def _limit(table: pd.DataFrame, max_images: int | None, seed: int) -> pd.DataFrame:
    """Stratified subsample of a split table (by split and label) for smoke runs."""
    if not max_images or max_images >= len(table):
        return table
    frac = max_images / len(table)
    parts = [g.sample(n=max(2, round(len(g) * frac)), random_state=seed) for _, g in table.groupby(["split", "label"])]
    return pd.concat(parts).sort_values("path").reset_index(drop=True)


def _prepare_split(config: RunConfig, dataset) -> Split:
    """The run's split, checked; saved by the caller once the run folder may be created."""
    if config.split:
        split = load_split(config.split, dataset)
    else:
        split = make_split(dataset, config.split_kind, seed=config.seed)
    split.table = _limit(split.table, config.max_images, seed=0)  # same subset for every training seed
    for part in ("train", "test"):
        labels = set(split.table.loc[split.table["split"] == part, "label"])
        if len(labels) < 2:
            raise CovidlibError(f"the {part} split of {config.split or 'the new split'} holds "
                                f"{'only ' + labels.pop() if labels else 'no'} images; it needs both classes")
    return split


def _compile(model, config: RunConfig, learning_rate: float, loss) -> None:
    import keras

    from covidlib.runtime import gpus

    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=loss, metrics=["accuracy"],
                  jit_compile=bool(gpus()))  # XLA pays off on GPUs; on these CPUs it is 5-8x slower


def _features(model, config: RunConfig, dataset, images_all: np.ndarray) -> tuple[np.ndarray, float]:
    """Pooled backbone features of every image, computed once and cached on disk.

    Keyed by architecture, weights, input size, resize mode and data; with random
    weights the seed decides the backbone, so it is part of the key too. Also returns
    the backbone pass's images per second (kept beside the cache), which is the
    frozen model's inference speed: the head adds one matrix-vector product.
    """
    from covidlib.models import feature_model

    weights_id = config.weights if config.weights in ("none", "imagenet") else file_hash(config.weights)[:12]
    seed_part = f"-seed{config.seed}" if config.weights == "none" else ""
    key = f"{config.arch}-{weights_id}{seed_part}-{config.input_size}-{config.resize}-{dataset.manifest_hash[:16]}"
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
    from covidlib.runtime import tf

    ds = tf().data.Dataset.from_tensor_slices(images).batch(batch_size)
    return ds.map(lambda x: tf().cast(x, tf().float32)).prefetch(2)


def _verbose() -> int:
    return 1 if sys.stdout.isatty() else 2


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


def _fit_head(head, make, val_ds, config: RunConfig, state: _State, ckpt_dir: Path) -> None:
    """A frozen run's head in one ``fit``: an epoch over cached features costs ~0.1-0.2 s on
    2 cores, mostly Keras overhead, so a ``fit`` call and a checkpoint per epoch would cost
    more than the training itself. A restart simply retrains the head."""
    import keras

    has_val = val_ds is not None

    class Track(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            seconds = time.perf_counter() - self.t0
            row = {"epoch": epoch + 1, **{k: float(v) for k, v in (logs or {}).items()}, "seconds": round(seconds, 5)}
            state.history.append(row)
            state.train_seconds += seconds
            state.epoch = epoch + 1
            if _improved(state, row, has_val, config.patience):
                head.save_weights(ckpt_dir / "best.weights.h5")
            self.model.stop_training = state.stopped

    train_ds = make("train", True)
    head.fit(train_ds, validation_data=val_ds, epochs=config.epochs, callbacks=[Track()], shuffle=False, verbose=0)


def _reseed_random_layers(models, seed: int, epoch: int) -> None:
    """Put every dropout and augmentation RNG in a state that depends only on (seed, epoch).

    Keras layers draw from SeedGenerators whose state advances with each call; a model loaded
    from a checkpoint (and a rebuilt augmentation pipeline) starts them afresh, so without this
    a resumed run's dropout masks and augmentations differ from the uninterrupted run's.
    """
    import keras

    i = 0
    for m in models:
        for layer in m._flatten_layers(include_self=True, recursive=True):
            for sg in layer._seed_generators:  # Keras has no public accessor for them
                value = [(seed * 1_000_003 + epoch * 1_009 + i) % 2**31, 0]
                sg.state.assign(keras.ops.convert_to_tensor(value, dtype=sg.state.dtype))
                i += 1


def _fit_epochs(trainee, model, make, val_ds, config: RunConfig, state: _State, ckpt_dir: Path, loss,
                augment=None) -> None:
    """One ``fit`` per epoch with a checkpoint after each, so a killed run resumes where it stopped."""
    has_val = val_ds is not None
    from covidlib.models import unfreeze_top

    fault = int(os.environ.get(_FAULT_ENV, "-1"))
    for epoch in range(state.epoch, config.epochs):
        if state.stopped:
            break
        _reseed_random_layers([trainee, *([augment] if augment is not None else [])], config.seed, epoch)
        if config.mode == "finetune" and epoch == config.warmup_epochs:
            n = unfreeze_top(model, config.unfreeze_fraction)
            print(f"fine-tuning: {n} backbone layers unfrozen at lr {config.finetune_learning_rate}", file=sys.stderr)
            _compile(trainee, config, config.finetune_learning_rate, loss)
        t0 = time.perf_counter()
        h = trainee.fit(make("train", True, epoch), validation_data=val_ds, initial_epoch=epoch, epochs=epoch + 1,
                        shuffle=False,  # tf_dataset already shuffled, by (seed, epoch)
                        verbose=_verbose())
        seconds = time.perf_counter() - t0
        row = {"epoch": epoch + 1, **{k: float(v[-1]) for k, v in h.history.items()}, "seconds": round(seconds, 3)}
        state.history.append(row)
        state.train_seconds += seconds
        if _improved(state, row, has_val, config.patience):
            trainee.save_weights(ckpt_dir / "best.weights.h5")
        # The model file carries its epoch in its name, so state.json (written last) never
        # points at a checkpoint newer or older than the state it describes.
        name = f"epoch-{epoch + 1:04d}.keras"
        with atomic_path(ckpt_dir / name, suffix=".keras") as tmp:
            trainee.save(tmp)
        previous, state.checkpoint, state.epoch = state.checkpoint, name, epoch + 1
        state.save(ckpt_dir / "state.json")
        if previous and previous != name:
            (ckpt_dir / previous).unlink(missing_ok=True)
        if epoch + 1 == fault:
            os.kill(os.getpid(), signal.SIGKILL)


@contextmanager
def _one_writer(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock for ``run_dir`` while training into it; a second writer is refused.

    The lock file lies beside the run folder (``.NAME.lock``), so taking it creates nothing
    inside a folder that a refused run must leave untouched; the OS releases it when the
    process ends, killed or not, so a killed run can be resumed at once.
    """
    import fcntl

    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(run_dir.with_name(f".{run_dir.name}.lock"), "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CovidlibError(f"run folder {run_dir} is being written by another process; "
                                "wait for it or pass another --out") from None
        yield


def train(config: RunConfig, *, resume: bool = False, run_dir: str | Path | None = None) -> Path:
    """Train one architecture; return its run folder. One process at a time per run folder."""
    run_dir = Path(run_dir or config.out or default_run_dir(config))
    if run_dir.exists() and not run_dir.is_dir():
        raise CovidlibError(f"--out {run_dir} is a file, not a run folder")
    with _one_writer(run_dir):
        created = not run_dir.exists()
        try:
            return _train(config, resume, run_dir)
        except BaseException:
            # A run that stops before its first checkpoint has nothing to resume: leave no folder,
            # so the retry needs no --resume.
            if created and not (run_dir / CHECKPOINT / "state.json").exists():
                shutil.rmtree(run_dir, ignore_errors=True)
            raise


def _train(config: RunConfig, resume: bool, run_dir: Path) -> Path:
    import keras

    from covidlib.models import build_model, covid_probability, head_model, loss_and_target
    from covidlib.runtime import configure_accelerators, seed_everything, versions

    if resume and (run_dir / "metrics.json").exists():
        return run_dir  # finished earlier
    if not resume and run_dir.exists() and any(run_dir.iterdir()):
        raise CovidlibError(f"run folder {run_dir} already exists; pass --resume to continue it or --out elsewhere")
    ckpt_dir = run_dir / CHECKPOINT
    wall0 = time.perf_counter()

    seed_everything(config.seed)
    strategy = configure_accelerators()
    # Everything that can fail on bad input (data, weights, options) fails before the
    # run folder is created, so a refused run leaves nothing behind.
    dataset = load_dataset(data_dir(config.data), skip_bad=config.skip_bad, progress=sys.stderr.isatty())
    with strategy.scope():
        model = build_model(config.arch, input_size=config.input_size, weights=config.weights, mode=config.mode,
                            loss=config.loss, dropout=config.dropout)
    resuming_split = resume and (run_dir / "split.csv").exists()
    split = load_split(run_dir / "split.csv", dataset) if resuming_split else _prepare_split(config, dataset)
    # the split file decides the kind (a study passes its grouped split with the default split_kind)
    config = dataclasses.replace(config, split_kind=split.info.get("kind", config.split_kind))
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if not resuming_split:
        split.save(run_dir / "split.csv")
    cache = decoded(dataset, config.input_size, config.resize, progress=sys.stderr.isatty())
    parts = {p: take(cache, split.paths(p)) for p in ("train", "val", "test")}
    loss, target = loss_and_target(config.loss)
    has_val = len(parts["val"][1]) > 0

    frozen = config.mode == "frozen"
    if frozen:  # train only the head, on backbone features computed once and cached
        index = {p: i for i, p in enumerate(cache.paths)}
        feats, frozen_speed = _features(model, config, dataset, np.asarray(cache.images))
        inputs = {p: (feats[[index[q] for q in split.paths(p)]], parts[p][1]) for p in parts}
        trainee = head_model(model, feats.shape[1])
        trainee.get_layer("feature_norm").adapt(inputs["train"][0])
    else:
        inputs = parts
        trainee = model

    augment = None
    if config.augment and not frozen:
        augment = keras.Sequential([keras.layers.RandomFlip("horizontal", seed=config.seed),
                                    keras.layers.RandomRotation(0.05, seed=config.seed),
                                    keras.layers.RandomZoom(0.1, seed=config.seed)], name="augment")

    state = _State.load(ckpt_dir / "state.json")
    if resume and state.checkpoint:
        trainee = keras.models.load_model(ckpt_dir / state.checkpoint)
        if not frozen:
            model = trainee
        print(f"resuming {config.arch} from epoch {state.epoch}", file=sys.stderr)
    else:
        with strategy.scope():
            if config.mode == "finetune":
                model.get_layer("backbone").trainable = False
            _compile(trainee, config, config.learning_rate, loss)

    def make(part: str, shuffle: bool, epoch: int = 0):
        x, y = inputs[part]
        return tf_dataset(x, y, batch_size=config.batch_size, shuffle=shuffle, seed=config.seed * 1000 + epoch,
                          augment=augment if shuffle else None, target=target, reshuffle=frozen)

    val_ds = make("val", False) if has_val else None
    if frozen:
        _fit_head(trainee, make, val_ds, config, state, ckpt_dir)
    else:
        _fit_epochs(trainee, model, make, val_ds, config, state, ckpt_dir, loss, augment)

    if state.best_epoch > 0 and has_val:
        trainee.load_weights(ckpt_dir / "best.weights.h5")
    if frozen:
        model.get_layer("head").set_weights(trainee.get_layer("head").get_weights())

    def predict(part: str) -> np.ndarray:
        # Frozen runs: the trained head over the cached features is the full model's
        # output (tests check it) without a second backbone pass over val and test.
        return covid_probability((trainee if frozen else model).predict(
            _batches(inputs[part][0], config.batch_size), verbose=0))

    y_test = parts["test"][1]
    t0 = time.perf_counter()
    p_test = predict("test")
    infer_speed = frozen_speed if frozen else len(y_test) / max(time.perf_counter() - t0, 1e-9)
    from covidlib.metrics import binary_metrics

    metrics = binary_metrics(y_test, p_test)
    frames = [pd.DataFrame({"path": split.paths("test"), "split": "test", "y": y_test, "p_covid": p_test})]
    if has_val:  # kept so that thresholds and calibration can be chosen without touching the test split
        frames.append(pd.DataFrame({"path": split.paths("val"), "split": "val", "y": parts["val"][1],
                                    "p_covid": predict("val")}))
    predictions = pd.concat(frames, ignore_index=True)

    record: dict[str, Any] = {
        "config": config.to_dict(),
        "versions": versions(),
        "data": {"root": str(dataset.root), "manifest_hash": dataset.manifest_hash, "images": len(dataset.manifest),
                 "counts": dataset.counts(), "skipped": [asdict(b) for b in dataset.bad],
                 "size_quartiles": {k: [float(v) for v in np.percentile(dataset.manifest[k], [0, 25, 50, 75, 100])]
                                    for k in ("width", "height")}},
        "split": {"sha256": file_hash(run_dir / "split.csv"), **{k: v for k, v in split.info.items() if k != "sha256"},
                  "sizes": {p: int(len(parts[p][1])) for p in parts}},
        "epochs_run": state.epoch,
        "best_epoch": state.best_epoch,
        "parameters": int(model.count_params()),
        "train_seconds": round(state.train_seconds, 2),
        "train_images_per_second": round(len(parts["train"][1]) * state.epoch / max(state.train_seconds, 1e-9), 1),
        "inference_images_per_second": round(infer_speed, 1),
        "wall_seconds_this_process": round(time.perf_counter() - wall0, 2),
    }
    with atomic_path(run_dir / "model.keras", suffix=".keras") as tmp:
        model.save(tmp)
    pd.DataFrame(state.history).to_csv(run_dir / "history.csv", index=False)
    predictions.to_csv(run_dir / "predictions.csv", index=False)
    write_text_atomic(run_dir / "run.json", json.dumps(record, indent=2, default=str))
    write_text_atomic(run_dir / "metrics.json", json.dumps(metrics, indent=2))  # last: marks the run complete
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    print(f"{config.arch}: test accuracy {metrics['accuracy']:.4f}, AUC {metrics['auc']:.4f} "
          f"({len(y_test)} test images, {state.epoch} epochs, {record['train_seconds']:.0f} s training) -> {run_dir}")
    return run_dir
