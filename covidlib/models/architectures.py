"""The paper's nine architectures, built by name.

Every model takes raw grey slices, ``(S, S, 1)`` floats in 0..255, and does its own
preprocessing inside (a :class:`Preprocess` layer), so the same cached uint8 images
feed all nine and a saved ``.keras`` file needs nothing else to predict.
Output: one sigmoid unit (binary loss) or two softmax units (sparse / categorical);
either way :func:`covid_probability` returns P(COVID).

Backbones from ``keras.applications`` are nested as a sub-model named ``backbone``,
followed by global average pooling (``gap``), dropout and a dense ``head``, so that
class activation maps can be read off the head's weights.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from covidlib import CovidlibError, runtime
from covidlib.models.contract import BACKBONE, CLASSIFIER, FEATURE_NORM, POOLING, PREPROCESSING, Preprocess

LOSSES = ("binary", "sparse", "categorical")
MODES = ("scratch", "frozen", "finetune")


@dataclass(frozen=True)
class Architecture:
    name: str
    title: str
    input_size: int  # the paper's
    min_size: int
    loss: str  # the paper's loss family
    preprocess: str  # keras.applications' mode for this backbone
    backbone: str | None  # keras.applications function name; None = built by hand
    channels: int = 3


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in [
        Architecture("basic_cnn", "Basic CNN", 32, 8, "binary", "unit", None, channels=1),
        Architecture("alexnet", "AlexNet", 227, 67, "sparse", "unit", None, channels=1),
        Architecture("vgg16", "VGG16", 224, 32, "categorical", "caffe", "VGG16"),
        Architecture("vgg19", "VGG19", 224, 32, "categorical", "caffe", "VGG19"),
        Architecture("mobilenet", "MobileNet", 224, 32, "sparse", "tf", "MobileNet"),
        Architecture("resnet101", "ResNet101", 224, 32, "categorical", "caffe", "ResNet101"),
        Architecture("resnet152", "ResNet152", 224, 32, "categorical", "caffe", "ResNet152"),
        Architecture("densenet201", "DenseNet201", 224, 32, "categorical", "torch", "DenseNet201"),
        Architecture("inceptionv3", "InceptionV3", 224, 75, "categorical", "tf", "InceptionV3"),
    ]
}


def architecture(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise CovidlibError(f"unknown architecture {name!r}; valid: {', '.join(ARCHITECTURES)}") from None


def _basic_cnn(x, dropout: float):
    """Three Conv-Pool-Dropout blocks, four Dense(512)+Dropout, three Dense(512) (PAPER.md).

    The paper gives no filter counts or rates; ours: 32/64/128 filters of 3x3, dropout
    0.25 after each conv block and ``dropout`` (0.3 by default) after the dense layers.
    """
    layers = runtime.keras().layers
    for i, filters in enumerate((32, 64, 128), start=1):
        x = layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"conv{i}")(x)
        x = layers.MaxPooling2D(2, name=f"pool{i}")(x)
        x = layers.Dropout(0.25, name=f"drop{i}")(x)
    x = layers.Flatten(name="flatten")(x)
    for i in range(4):
        x = layers.Dense(512, activation="relu", name=f"fc{i + 1}")(x)
        x = layers.Dropout(dropout, name=f"fc_drop{i + 1}")(x)
    for i in range(4, 7):
        x = layers.Dense(512, activation="relu", name=f"fc{i + 1}")(x)
    return x


def _alexnet(x, dropout: float):
    """Krizhevsky et al. 2012: five convolutions, three max-pools, two FC-4096 with dropout.

    Batch normalisation stands in for the original local response normalisation.
    """
    layers = runtime.keras().layers
    x = layers.Conv2D(96, 11, strides=4, activation="relu", name="conv1")(x)
    x = layers.BatchNormalization(momentum=0.9, name="bn1")(x)
    x = layers.MaxPooling2D(3, strides=2, name="pool1")(x)
    x = layers.Conv2D(256, 5, padding="same", activation="relu", name="conv2")(x)
    x = layers.BatchNormalization(momentum=0.9, name="bn2")(x)
    x = layers.MaxPooling2D(3, strides=2, name="pool2")(x)
    x = layers.Conv2D(384, 3, padding="same", activation="relu", name="conv3")(x)
    x = layers.Conv2D(384, 3, padding="same", activation="relu", name="conv4")(x)
    x = layers.Conv2D(256, 3, padding="same", activation="relu", name="conv5")(x)
    x = layers.MaxPooling2D(3, strides=2, name="pool5")(x)
    x = layers.Flatten(name="flatten")(x)
    for i in (6, 7):
        x = layers.Dense(4096, activation="relu", name=f"fc{i}")(x)
        x = layers.Dropout(dropout, name=f"fc_drop{i}")(x)
    return x


def backbone_weights_argument(arch: Architecture, weights: str) -> str | None:
    """Translate ``--weights`` into what keras.applications accepts, checking it first."""
    if weights in ("none", "", None):
        return None
    if weights != "imagenet" and not Path(weights).is_file():
        raise CovidlibError(f"--weights {weights}: no such file (valid: imagenet, none, or a weights file path)")
    if arch.backbone is None:
        what = "ImageNet weights" if weights == "imagenet" else f"backbone to load --weights {weights} into"
        raise CovidlibError(f"{arch.name} is built by hand and has no {what}; use --weights none")
    return "imagenet" if weights == "imagenet" else str(weights)


def build_model(name: str, *, input_size: int | None = None, weights: str = "none", mode: str = "scratch",
                loss: str | None = None, dropout: float = 0.3):
    """Build architecture ``name`` for ``(S, S, 1)`` grey input. Returns an uncompiled keras.Model."""
    keras = runtime.keras()
    layers = keras.layers
    arch = architecture(name)
    size = input_size or arch.input_size
    loss = loss or arch.loss
    if loss not in LOSSES:
        raise CovidlibError(f"unknown loss {loss!r}; valid: {', '.join(LOSSES)}")
    if mode not in MODES:
        raise CovidlibError(f"unknown mode {mode!r}; valid: {', '.join(MODES)}")
    if size < arch.min_size:
        raise CovidlibError(f"--input-size {size} is too small for {name} (minimum {arch.min_size})")
    if arch.backbone is None and mode != "scratch":
        raise CovidlibError(f"{name} has no pretrained backbone; --mode must be scratch")
    backbone_weights = backbone_weights_argument(arch, weights)

    inputs = keras.Input((size, size, 1), name="image")
    x = Preprocess(arch.preprocess, arch.channels, name=PREPROCESSING)(inputs)
    if arch.backbone is None:
        x = (_basic_cnn if name == "basic_cnn" else _alexnet)(x, dropout)
    else:
        factory: Callable = getattr(keras.applications, arch.backbone)
        try:  # Keras' UserWarnings and its "Downloading data from" (stdout) must not precede the one-line error
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                # one fixed name, so explain.py can find the backbone nested inside the classifier
                backbone = factory(include_top=False, weights=backbone_weights, input_shape=(size, size, 3),
                                   name=BACKBONE)
        except Exception as exc:  # urllib / HTTP / OSError when offline
            if backbone_weights != "imagenet":
                reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
                raise CovidlibError(f"--weights {weights}: cannot load into {name} ({type(exc).__name__}: {reason})") from None
            raise CovidlibError(
                f"cannot download ImageNet weights for {name} (offline?): place the '{arch.backbone}' "
                "no-top weights file in ~/.keras/models/, or pass --weights PATH, or --weights none"
            ) from None
        backbone.trainable = mode == "scratch"
        if mode == "scratch":
            # Keras' default BatchNorm momentum (0.99) needs thousands of steps before the moving
            # statistics fit the data; on a 56-step epoch the model then predicts one class at
            # inference while training fine (seen with MobileNet). 0.9 settles within an epoch.
            for layer in backbone.layers:
                if isinstance(layer, layers.BatchNormalization):
                    layer.momentum = 0.9
        # A frozen backbone keeps BatchNorm in inference mode, as in the Keras transfer-learning guide.
        x = backbone(x, training=False if mode != "scratch" else None)
        x = layers.GlobalAveragePooling2D(name=POOLING)(x)
        if mode == "frozen":
            # Standardise the pooled features (statistics set from the training split by
            # ``train``): a linear head on a random backbone's raw features, whose scale is
            # ~1e-4, barely moves in 200 epochs (measured: InceptionV3 validation accuracy 63%
            # raw, 89% standardised, on the same cached features).
            x = layers.Normalization(axis=-1, name=FEATURE_NORM)(x)
        x = layers.Dropout(dropout, name="head_dropout")(x)
    units, activation = (1, "sigmoid") if loss == "binary" else (2, "softmax")
    outputs = layers.Dense(units, activation=activation, dtype="float32", name=CLASSIFIER)(x)
    return keras.Model(inputs, outputs, name=name)


