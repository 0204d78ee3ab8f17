"""A finished run's model on disk when its backbone is a frozen *random* draw.

Such a backbone is the same for every run that draws it from the same seed, and it is most of
the bytes (ResNet152: 58 M parameters, 233 MB at any input size). So the run keeps the recipe of
the draw with a checksum of the drawn weights, plus the weights of the layers outside the backbone
(the feature standardisation and the head). Loading draws the backbone again and refuses, in one
line, if the draw differs (another Keras may draw differently). The recipe is written only after
a draw in this process reproduced the checksum; otherwise the run saves the whole model.
"""

from __future__ import annotations

import hashlib
import random
from importlib import metadata

import numpy as np

from covidlib import CovidlibError, runtime
from covidlib.models.architectures import build_model
from covidlib.models.config import RunConfig
from covidlib.models.contract import backbone


def weights_checksum(layer) -> str:
    digest = hashlib.sha256()
    for array in layer.get_weights():
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def recipe(model, config: RunConfig) -> dict | None:
    """The draw that rebuilds ``model``'s backbone, checked by drawing it again; None when the run
    has no random frozen backbone or the draw does not reproduce (then the whole model is saved)."""
    if not config.random_backbone or backbone(model) is None:
        return None
    keras = runtime.keras()
    made = {"arch": config.arch, "input_size": config.input_size, "loss": config.loss, "dropout": config.dropout,
            "seed": config.backbone_draw, "dtype_policy": keras.mixed_precision.global_policy().name,
            "versions": _drawing_versions(), "backbone_sha256": weights_checksum(backbone(model))}
    return made if weights_checksum(backbone(draw(made))) == made["backbone_sha256"] else None


def _drawing_versions() -> dict[str, str]:
    """What decides a draw: the builders (covidlib) and the initialisers (Keras, TensorFlow)."""
    return {pkg: metadata.version(pkg) for pkg in ("covidlib", "keras", "tensorflow")}


def draw(made: dict):
    """The model of ``made`` with its backbone drawn from its seed, as training drew it, and its other
    layers freshly initialised. Python's and NumPy's global random states are put back afterwards;
    TensorFlow's global seed stays set to the run's (Keras sets all of them at once)."""
    keras = runtime.keras()
    policy, python_state, numpy_state = keras.mixed_precision.global_policy(), random.getstate(), np.random.get_state()
    keras.mixed_precision.set_global_policy(made["dtype_policy"])
    try:
        keras.utils.set_random_seed(made["seed"])
        return build_model(made["arch"], input_size=made["input_size"], weights="none", mode="frozen",
                           loss=made["loss"], dropout=made["dropout"])
    finally:
        keras.mixed_precision.set_global_policy(policy)
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def trained_weights(model) -> dict[str, np.ndarray]:
    """The weights of every layer but the backbone, keyed by position (Keras numbers unnamed
    layers by how many were made before them in the process, so names do not repeat)."""
    return {f"{i:03d}/{j}": w for i, layer in enumerate(model.layers) if layer is not backbone(model)
            for j, w in enumerate(layer.get_weights())}


def rebuild(made: dict, trained: dict[str, np.ndarray], source: str):
    """The saved model: the backbone drawn again (checked against its checksum), the rest set."""
    missing = {"arch", "input_size", "loss", "dropout", "seed", "dtype_policy", "versions", "backbone_sha256"} - set(made)
    if missing:
        raise CovidlibError(f"{source} lacks {', '.join(sorted(missing))}; the run folder is damaged")
    model = draw(made)
    if weights_checksum(backbone(model)) != made["backbone_sha256"]:
        then = ", ".join(f"{k} {v}" for k, v in made["versions"].items())
        now = ", ".join(f"{k} {v}" for k, v in _drawing_versions().items())
        raise CovidlibError(f"{source}: the random {made['arch']} backbone drawn again from seed {made['seed']} differs "
                            f"from the trained one (drawn with {then}; this is {now}); retrain the run")
    for i, layer in enumerate(model.layers):
        if layer is backbone(model):
            continue
        arrays = [trained.get(f"{i:03d}/{j}") for j in range(len(layer.get_weights()))]
        if any(a is None or a.shape != w.shape for a, w in zip(arrays, layer.get_weights(), strict=True)):
            raise CovidlibError(f"{source}: no saved weights for layer {layer.name}; the run folder is damaged")
        layer.set_weights(arrays)
        if hasattr(layer, "finalize_state"):  # an adapted Normalization computes its mean and variance here
            layer.finalize_state()
    return model
