"""One dataclass describes a training run; presets are small YAML files that fill it.

Parameters flow one way: CLI flags or a papermill cell -> :func:`resolve` -> RunConfig
-> the library. A preset file has ``defaults`` and per-architecture ``archs`` entries;
copy one from ``covidlib/presets/`` to make your own and pass its path as the preset.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from covidlib import CovidlibError
from covidlib.models import LOSSES, MODES, architecture
from covidlib.paths import PACKAGE_DIR

PRESET_DIR = PACKAGE_DIR / "presets"
PRESETS = tuple(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))


@dataclass
class RunConfig:
    arch: str
    preset: str = "smoke"
    data: str | None = None  # None: $COVIDLIB_DATA, else the embedded sample
    split: str | None = None  # a split CSV; None: make one (split_kind, seed) into the run folder
    split_kind: str = "random"
    seed: int = 42
    weights: str = "none"  # none | imagenet | path
    mode: str = "scratch"  # scratch | frozen | finetune
    input_size: int | None = None  # None: the architecture's paper size
    resize: str = "stretch"
    batch_size: int = 32
    epochs: int = 10
    learning_rate: float = 1e-3
    finetune_learning_rate: float = 1e-5
    warmup_epochs: int = 2  # finetune: head-only epochs before unfreezing
    unfreeze_fraction: float = 0.3  # finetune: top share of backbone layers to train
    dropout: float = 0.3
    loss: str | None = None  # None: the paper's loss family for this architecture
    patience: int = 5  # early stopping on validation loss
    augment: bool = False
    max_images: int | None = None  # stratified subsample (smoke runs)
    skip_bad: bool = False
    out: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        arch = architecture(self.arch)
        self.input_size = int(self.input_size or arch.input_size)
        self.loss = self.loss or arch.loss
        if self.loss not in LOSSES:
            raise CovidlibError(f"unknown loss {self.loss!r}; valid: {', '.join(LOSSES)}")
        if self.mode not in MODES:
            raise CovidlibError(f"unknown mode {self.mode!r}; valid: {', '.join(MODES)}")
        for name in ("batch_size", "epochs"):
            if int(getattr(self, name)) < 1:
                raise CovidlibError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_preset(preset: str) -> dict[str, Any]:
    path = Path(preset)
    if not path.suffix:
        path = PRESET_DIR / f"{preset}.yaml"
    if not path.exists():
        raise CovidlibError(f"unknown preset {preset!r}; valid: {', '.join(PRESETS)}, or a path to a YAML file")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise CovidlibError(f"preset file {path} is not valid YAML ({str(exc).splitlines()[0]})") from None


def resolve(arch: str, preset: str = "smoke", **overrides: Any) -> RunConfig:
    """Preset defaults, then the preset's entry for ``arch``, then explicit overrides."""
    architecture(arch)
    spec = load_preset(preset)
    values: dict[str, Any] = {**spec.get("defaults", {}), **(spec.get("archs", {}) or {}).get(arch, {})}
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise CovidlibError(f"unknown setting {unknown[0]!r} in preset {preset}; valid: {', '.join(sorted(known))}")
    return RunConfig(arch=arch, preset=str(preset), **values)


def preset_archs(preset: str) -> list[str]:
    """The architectures a preset lists, in its order."""
    return list((load_preset(preset).get("archs") or {}).keys())
