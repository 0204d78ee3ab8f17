"""TensorFlow import, seeding and device set-up in one place.

Every module that needs TensorFlow imports it through :func:`tf`, after ``covidlib``
has set the oneDNN flag, so the speed-up is never lost to import order.
"""

from __future__ import annotations

import os
import platform
from importlib import metadata
from types import ModuleType

from covidlib.paths import git_commit


def tf() -> ModuleType:
    import tensorflow  # the covidlib package __init__ has already set the oneDNN flag

    return tensorflow


def keras() -> ModuleType:
    """Keras, imported after TensorFlow (its backend) and the oneDNN flag."""
    tf()
    import keras as _keras

    return _keras


# Tests and the GPU check set this to split the CPU into N logical devices, the stand-in for
# several GPUs: MirroredStrategy then runs the same code path it runs on a multi-GPU machine.
CPU_DEVICES_ENV = "COVIDLIB_CPU_DEVICES"


def gpus() -> list:
    return tf().config.list_physical_devices("GPU")


def device_policy(deterministic: bool | None = None, mixed_precision: bool | None = None) -> dict:
    """How a run computes, decided in one place and recorded in run.json.

    - GPU: mixed precision (float16 compute, float32 head) and XLA, both measured wins on GPUs;
      op determinism only when asked, and then no XLA: TensorFlow has no deterministic XLA
      kernel for the MaxPool gradient (tensorflow#69417), which the Basic CNN, AlexNet, VGG and
      InceptionV3 need.
    - CPU: float32, no XLA (5-8x slower on the CPUs measured), deterministic ops (exact resume
      and repeatable runs; cheap on a CPU).
    - Several GPUs (or ``$COVIDLIB_CPU_DEVICES`` logical CPUs): a MirroredStrategy.
    """
    n_gpus = len(gpus())
    on_gpu = n_gpus > 0
    deterministic = (not on_gpu) if deterministic is None else bool(deterministic)
    replicas = n_gpus if on_gpu else int(os.environ.get(CPU_DEVICES_ENV, "1") or 1)
    return {"device": "GPU" if on_gpu else "CPU", "gpus": n_gpus, "replicas": max(replicas, 1),
            "strategy": "MirroredStrategy" if replicas > 1 else "default",
            "mixed_precision": "mixed_float16" if (on_gpu if mixed_precision is None else mixed_precision) else "float32",
            "jit_compile": on_gpu and not deterministic, "deterministic_ops": deterministic}


def apply_policy(policy: dict, seed: int):
    """Seed everything, set precision and determinism, and return the strategy to build under."""
    import keras

    t = tf()
    if policy["strategy"] == "MirroredStrategy" and policy["device"] == "CPU":
        _split_cpu(policy["replicas"])
    keras.utils.set_random_seed(seed)
    if policy["deterministic_ops"]:
        t.config.experimental.enable_op_determinism()
    else:
        from tensorflow.python.framework import config as tf_config

        tf_config.disable_op_determinism()
    keras.mixed_precision.set_global_policy(policy["mixed_precision"])
    if policy["strategy"] == "MirroredStrategy":
        devices = [d.name for d in t.config.list_logical_devices("GPU" if policy["device"] == "GPU" else "CPU")]
        return t.distribute.MirroredStrategy(devices)
    return t.distribute.get_strategy()


def _split_cpu(n: int) -> None:
    """N logical CPU devices; must happen before TensorFlow initialises its devices."""
    t = tf()
    cpu = t.config.list_physical_devices("CPU")[0]
    if len(t.config.get_logical_device_configuration(cpu) or []) != n:
        try:
            t.config.set_logical_device_configuration(cpu, [t.config.LogicalDeviceConfiguration()] * n)
        except RuntimeError:  # devices already initialised in this process: keep what there is
            pass


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
    out["covidlib_commit"] = git_commit()
    return out
