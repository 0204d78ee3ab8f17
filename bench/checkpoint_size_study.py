"""A finished run's model.keras with and without the optimizer's state, for every architecture of a
preset (default smoke), as `covidlib study` saves them: scratch and fine-tune models after one Adam step
(its two slots per trainable weight exist), frozen models as trained (only their head is compiled).

    python bench/checkpoint_size_study.py [--preset smoke]

Prints each model's file size both ways and the ratio; a study's runs/ is dominated by these files
(one per architecture and split)."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np

from covidlib import runtime
from covidlib.models.architectures import build_model
from covidlib.models.config import Preset
from covidlib.models.contract import loss_and_target


def sizes(arch: str, preset: str) -> tuple[int, int]:
    keras = runtime.keras()
    config = Preset.load(preset).run_config(arch)
    model = build_model(arch, input_size=config.input_size, mode=config.mode, loss=config.loss)
    with tempfile.TemporaryDirectory() as tmp:
        if config.mode != "frozen":
            loss, target = loss_and_target(config.loss)
            model.compile(optimizer=keras.optimizers.Adam(config.learning_rate), loss=loss)
            x = np.zeros((2, config.input_size, config.input_size, 1), np.float32)
            y = np.array([0, 1]) if target != "onehot" else np.eye(2)
            model.train_on_batch(x, y.reshape(2, -1) if target == "binary" else y)
        model.save(Path(tmp) / "with.keras")
        optimizer = getattr(model, "optimizer", None)
        model.optimizer = None
        model.save(Path(tmp) / "without.keras")
        model.optimizer = optimizer
        return os.path.getsize(Path(tmp) / "with.keras"), os.path.getsize(Path(tmp) / "without.keras")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smoke")
    args = parser.parse_args()
    total = np.zeros(2)
    for arch in Preset.load(args.preset).archs:
        before, after = sizes(arch, args.preset)
        total += (before, after)
        print(f"{arch:<12} with optimizer {before / 1e6:8.1f} MB   without {after / 1e6:8.1f} MB   ratio {after / before:.2f}")
    print(f"{'all':<12} with optimizer {total[0] / 1e6:8.1f} MB   without {total[1] / 1e6:8.1f} MB   "
          f"ratio {total[1] / total[0]:.2f} (a study has one run per architecture and split)")


if __name__ == "__main__":
    main()
