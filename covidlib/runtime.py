"""TensorFlow import, seeding and device set-up in one place.

Every module that needs TensorFlow imports it through :func:`tf`, after ``covidlib``
has set the oneDNN flag, so the speed-up is never lost to import order.
"""

from __future__ import annotations

import os
import platform
from importlib import metadata
from types import ModuleType


def tf() -> ModuleType:
    import tensorflow  # the covidlib package __init__ has already set the oneDNN flag

    return tensorflow


_DETERMINISTIC = {"on": False}


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed Python, NumPy and TensorFlow; on CPU also make every op deterministic."""
    import keras

    keras.utils.set_random_seed(seed)
    if deterministic:
        tf().config.experimental.enable_op_determinism()
        _DETERMINISTIC["on"] = True


def gpus() -> list:
    return tf().config.list_physical_devices("GPU")


def configure_accelerators(mixed_precision: bool | None = None):
    """GPU fast path (mixed precision; a MirroredStrategy for several GPUs); a no-op on CPU.

    Returns the ``tf.distribute`` strategy to build and compile models under.
    """
    import keras

    devices = gpus()
    use_mixed = bool(devices) if mixed_precision is None else mixed_precision
    keras.mixed_precision.set_global_policy("mixed_float16" if use_mixed else "float32")
    if len(devices) > 1:
        return tf().distribute.MirroredStrategy()
    return tf().distribute.get_strategy()


def device_policy() -> dict:
    """What the run computed on and how (recorded in run.json): devices, precision, XLA, determinism."""
    import keras

    devices = gpus()
    return {"devices": [d.name for d in devices] or ["CPU"], "gpus": len(devices),
            "mixed_precision": keras.mixed_precision.global_policy().name,
            "jit_compile": bool(devices), "deterministic_ops": _DETERMINISTIC["on"]}


def versions() -> dict[str, str]:
    """Versions of everything that can change a number in a run folder."""
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("covidlib", "tensorflow", "keras", "numpy", "scikit-learn", "opencv-python-headless",
                "pillow", "imagehash"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    out["TF_ENABLE_ONEDNN_OPTS"] = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "")
    return out
