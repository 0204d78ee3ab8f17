"""Disk used by a run's checkpoints, per architecture at the `paper` preset's input size.

    python bench/checkpoint_size.py [--archs alexnet vgg16 ...]

A run keeps two files while it trains and deletes both when it finishes: the last epoch's
model with its optimizer state (``checkpoint/epoch-N.keras``, what a resume needs) and the best
epoch's weights (``checkpoint/best-weights.npz``, layer weights only). Both are measured here after one optimizer step
(Adam's slots exist), with the trainable part a run has at its largest: everything for the two
models trained from scratch, the head plus the unfrozen top 30% for the fine-tuned ones.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

import covidlib  # noqa: F401  (quiet TensorFlow start)
from covidlib.models.architectures import ARCHITECTURES, build_model
from covidlib.models.config import resolve
from covidlib.models.contract import loss_and_target, unfreeze_top
from covidlib.models.runs import RunFolder


def sizes(arch: str) -> tuple[int, float, float]:
    import keras

    config = resolve(arch, "paper", weights="none")
    model = build_model(arch, input_size=config.input_size, mode=config.mode, loss=config.loss)
    if config.mode == "finetune":
        unfreeze_top(model, config.unfreeze_fraction)
    loss, target = loss_and_target(config.loss)
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss=loss)
    x = np.zeros((2, config.input_size, config.input_size, 1), np.float32)
    y = np.zeros((2, 2), np.float32) if target == "onehot" else np.zeros(2, np.float32 if target == "binary" else np.int64)
    model.train_on_batch(x, y)
    with tempfile.TemporaryDirectory() as tmp:
        model.save(Path(tmp) / "last.keras")
        RunFolder(Path(tmp)).save_best(model)
        last = (Path(tmp) / "last.keras").stat().st_size / 2**20
        best = RunFolder(Path(tmp)).best_weights_file.stat().st_size / 2**20
    return config.input_size, last, best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", nargs="+", default=list(ARCHITECTURES), choices=list(ARCHITECTURES))
    args = p.parse_args()
    print(f"{'arch':<12} {'input':>5} {'last epoch (.keras)':>20} {'best weights':>13} {'both':>8}")
    for arch in args.archs:
        size, last, best = sizes(arch)
        print(f"{arch:<12} {size:>5} {last:>17.0f} MB {best:>10.0f} MB {last + best:>5.0f} MB", flush=True)


if __name__ == "__main__":
    main()
