"""One dataclass describes a training run; presets are small YAML files that fill it.

Parameters flow one way: CLI flags or a papermill cell -> :func:`resolve` -> RunConfig
-> the library. A preset file has ``defaults`` and per-architecture ``archs`` entries;
copy one from ``covidlib/presets/`` to make your own and pass its path as the preset.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from covidlib import CovidlibError
from covidlib.data.images import RESIZE_MODES
from covidlib.data.lungs import LUNG_VIEWS
from covidlib.models.architectures import LOSSES, MODES, architecture
from covidlib.paths import PACKAGE_DIR
from covidlib.vocabulary import DEFAULT_SEED, SEED_RANGE

PRESET_DIR = PACKAGE_DIR / "presets"
PRESETS = tuple(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))


@dataclass
class RunConfig:
    arch: str
    preset: str = "smoke"
    data: str | None = None  # None: $COVIDLIB_DATA, else the embedded sample
    split: str | None = None  # a split CSV; None: make one (split_kind, seed) into the run folder
    split_kind: str = "random"
    seed: int = DEFAULT_SEED
    # the draw of a random frozen backbone; None: ``seed``. A study with several seeds keeps its
    # main seed's backbone, so the cached features serve every seed and only the head changes.
    backbone_seed: int | None = None
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
    lungs: str = "whole"  # whole | no_lungs | lungs_only: the lung-masked experiment's view of every slice
    max_images: int | None = None  # stratified subsample (smoke runs)
    skip_bad: bool = False
    deterministic: bool | None = None  # None: the device policy's default (CPU yes, GPU no; see runtime)
    mixed_precision: bool | None = None  # None: on a GPU only
    out: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        arch = architecture(self.arch)
        self.input_size = arch.input_size if self.input_size is None else self.input_size  # 0 is refused below
        self.loss = arch.loss if self.loss is None else self.loss
        if self.backbone_seed == self.seed:
            self.backbone_seed = None  # one spelling of "the run's own seed", so one identity
        for name, rule in _RULES.items():
            setattr(self, name, _checked(name, getattr(self, name), *rule, preset=self.preset))
        if self.loss not in LOSSES:
            raise CovidlibError(f"unknown loss {self.loss!r}; valid: {', '.join(LOSSES)}")
        if self.mode not in MODES:
            raise CovidlibError(f"unknown mode {self.mode!r}; valid: {', '.join(MODES)}")
        if self.lungs not in LUNG_VIEWS:
            raise CovidlibError(f"unknown lung view {self.lungs!r}; valid: {', '.join(LUNG_VIEWS)}")
        if self.resize not in RESIZE_MODES:
            raise CovidlibError(f"unknown resize {self.resize!r}; valid: {', '.join(RESIZE_MODES)}")

    @property
    def random_backbone(self) -> bool:
        return self.mode == "frozen" and self.weights == "none"

    @property
    def backbone_draw(self) -> int:
        """The seed that draws a random backbone's weights."""
        return self.seed if self.backbone_seed is None else self.backbone_seed

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Each setting's type and allowed range (inclusive; None: open). The upper bounds are far above
# any sensible run and exist so that a typo or a tampered run.json cannot ask for, say, a
# 144 GB decode cache (input_size) or a billion epochs.
_RULES: dict[str, tuple[type, float | None, float | None]] = {
    "seed": (int, *SEED_RANGE), "backbone_seed": (int, *SEED_RANGE), "input_size": (int, 16, 1024), "batch_size": (int, 1, 4096),
    "epochs": (int, 1, 100_000), "learning_rate": (float, 1e-9, 10.0), "finetune_learning_rate": (float, 1e-12, 10.0),
    "warmup_epochs": (int, 0, 100_000), "unfreeze_fraction": (float, 0.0, 1.0), "dropout": (float, 0.0, 0.95),
    "patience": (int, 1, 100_000), "max_images": (int, 8, None), "augment": (bool, None, None),
    "skip_bad": (bool, None, None), "deterministic": (bool, None, None), "mixed_precision": (bool, None, None),
    "preset": (str, None, None), "data": (str, None, None), "split": (str, None, None),
    "split_kind": (str, None, None), "weights": (str, None, None), "mode": (str, None, None),
    "resize": (str, None, None), "loss": (str, None, None), "out": (str, None, None), "lungs": (str, None, None),
}
_KIND = {int: "a whole number", float: "a number", bool: "true or false", str: "text"}


def _checked(name: str, value: Any, kind: type, low, high, *, preset: str) -> Any:
    """``value`` as ``kind`` within [low, high], or a one-line error naming the setting and the preset."""
    if value is None and (kind is str or name in ("max_images", "deterministic", "mixed_precision", "backbone_seed")):
        return value
    flag = f"--{name.replace('_', '-')}"
    where = f" (preset {preset})" if preset else ""
    ok = (isinstance(value, bool) if kind is bool else
          isinstance(value, int) and not isinstance(value, bool) if kind is int else
          isinstance(value, int | float) and not isinstance(value, bool) if kind is float else
          isinstance(value, str | os.PathLike))
    if not ok:
        raise CovidlibError(f"{flag} must be {_KIND[kind]}, got {value!r}{where}")
    value = str(value) if kind is str else kind(value)
    if kind is float and not math.isfinite(value):
        raise CovidlibError(f"{flag} must be a finite number, got {value!r}{where}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise CovidlibError(f"{flag} must be {bounds}, got {value!r}{where}")
    return value


def _read_preset(preset: str) -> tuple[Path, dict[str, Any]]:
    path = Path(preset)
    if not path.suffix:
        path = PRESET_DIR / f"{preset}.yaml"
    if not path.exists():
        raise CovidlibError(f"unknown preset {preset!r}; valid: {', '.join(PRESETS)}, or a path to a YAML file")
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise CovidlibError(f"preset file {path} is not UTF-8 text") from None
    except yaml.YAMLError as exc:
        raise CovidlibError(f"preset file {path} is not valid YAML ({str(exc).splitlines()[0]})") from None
    except OSError as exc:
        raise CovidlibError(f"preset file {path} cannot be read ({exc.strerror})") from None
    if spec is None:  # built-in defaults without a word would pass for the file's settings
        raise CovidlibError(f"preset file {path} is empty; copy one from {PRESET_DIR} and edit it")
    if not isinstance(spec, dict):
        raise CovidlibError(f"preset file {path} must be a mapping with 'defaults' and 'archs', got {type(spec).__name__}")
    return path, spec


STUDY_SETTINGS = {"seeds": "training seeds per model on the random split", "jobs": "training notebooks at once",
                  "scan_folds": "folds of the validity chapter's cross-validation over scans (0: none)",
                  "sanity_slices": "COVID and as many non-COVID test slices per model in the map sanity checks"}
_STUDY_DEFAULTS = {"seeds": 1, "jobs": 1, "scan_folds": 0, "sanity_slices": 20}


@dataclass(frozen=True)
class Preset:
    """A preset file read once: its run settings per architecture and its study settings."""

    name: str
    spec: dict[str, Any]

    @classmethod
    def load(cls, preset: str) -> Preset:
        return cls(str(preset), _read_preset(preset)[1])

    @property
    def archs(self) -> list[str]:
        """The architectures the preset lists, in its order."""
        return list((self.spec.get("archs") or {}).keys())

    @property
    def study(self) -> dict[str, int]:
        """The ``study:`` mapping (:data:`STUDY_SETTINGS`), checked; the defaults where it leaves them out."""
        spec = self.spec.get("study") or {}
        if not isinstance(spec, dict) or set(spec) - set(STUDY_SETTINGS):
            raise CovidlibError(f"preset {self.name}: 'study' must map {', '.join(STUDY_SETTINGS)} to whole "
                                f"numbers, got {spec!r}")
        out = {}
        for name in STUDY_SETTINGS:
            value = spec.get(name, _STUDY_DEFAULTS[name])
            low = 2 if name == "scan_folds" and value != 0 else min(_STUDY_DEFAULTS[name], 1)
            high = 20 if name == "scan_folds" else None  # make_kfold's own limit
            if isinstance(value, bool) or not isinstance(value, int) or value < low or (high and value > high):
                rule = "0 or a whole number from 2 to 20" if name == "scan_folds" else "a whole number >= 1"
                raise CovidlibError(f"preset {self.name}: study {name} must be {rule}, got {value!r}")
            out[name] = value
        return out

    def run_config(self, arch: str, **overrides: Any) -> RunConfig:
        """Preset defaults, then the preset's entry for ``arch``, then explicit overrides."""
        defaults, archs = self.spec.get("defaults") or {}, self.spec.get("archs") or {}
        entry = archs.get(arch) or {} if isinstance(archs, dict) else None
        for what, part in (("defaults", defaults), ("archs", archs), (f"archs: {arch}", entry)):
            if not isinstance(part, dict):
                raise CovidlibError(f"preset {self.name}: '{what}' must be a mapping of settings, got {type(part).__name__}")
        values: dict[str, Any] = {**defaults, **entry}
        values.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in dataclasses.fields(RunConfig)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise CovidlibError(f"unknown setting {unknown[0]!r} in preset {self.name}; valid: {', '.join(sorted(known))}")
        return RunConfig(arch=arch, preset=self.name, **values)


def resolve(arch: str, preset: str = "smoke", **overrides: Any) -> RunConfig:
    """The one way parameters become a run's config: a preset's settings for ``arch``, then ``overrides``."""
    return Preset.load(preset).run_config(arch, **overrides)
