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

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from covidlib import CovidlibError

LOSSES = ("binary", "sparse", "categorical")
MODES = ("scratch", "frozen", "finetune")
PREPROCESS = ("unit", "tf", "caffe", "torch")
# ImageNet statistics used by keras.applications' "caffe" (BGR means) and "torch" modes.
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)


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


def _keras():
    from covidlib.runtime import tf

    tf()
    import keras

    return keras


@functools.cache
def _preprocess_layer():
    keras = _keras()
    ops = keras.ops

    @keras.saving.register_keras_serializable(package="covidlib")
    class Preprocess(keras.layers.Layer):
        """Grey 0..255 -> what the backbone was trained on (keras.applications' modes)."""

        def __init__(self, mode: str = "unit", channels: int = 3, **kwargs):
            super().__init__(**kwargs)
            self.mode, self.channels = mode, channels

        def call(self, x):
            x = ops.cast(x, "float32")
            if self.channels == 3:
                x = ops.repeat(x, 3, axis=-1)
            if self.mode == "unit":
                return x / 255.0
            if self.mode == "tf":
                return x / 127.5 - 1.0
            if self.mode == "caffe":  # RGB -> BGR is a no-op on grey; subtract BGR means
                return x - ops.convert_to_tensor(_CAFFE_MEAN_BGR[: self.channels], "float32")
            mean = ops.convert_to_tensor(_TORCH_MEAN[: self.channels], "float32")
            std = ops.convert_to_tensor(_TORCH_STD[: self.channels], "float32")
            return (x / 255.0 - mean) / std

        def compute_output_shape(self, input_shape):
            return (*input_shape[:-1], self.channels)

        def get_config(self):
            return {**super().get_config(), "mode": self.mode, "channels": self.channels}

    return Preprocess


def Preprocess(mode: str, channels: int, **kwargs):  # noqa: N802  (a layer factory)
    if mode not in PREPROCESS:
        raise CovidlibError(f"unknown preprocessing {mode!r}; valid: {', '.join(PREPROCESS)}")
    return _preprocess_layer()(mode=mode, channels=channels, **kwargs)


def _basic_cnn(x, dropout: float):
    """Three Conv-Pool-Dropout blocks, four Dense(512)+Dropout, three Dense(512) (PAPER.md).

    The paper gives no filter counts or rates; ours: 32/64/128 filters of 3x3, dropout
    0.25 after each conv block and ``dropout`` (0.3 by default) after the dense layers.
    """
    layers = _keras().layers
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
    layers = _keras().layers
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
    if arch.backbone is None:
        raise CovidlibError(f"{arch.name} is built by hand and has no ImageNet weights; use --weights none")
    if weights == "imagenet":
        return "imagenet"
    if not Path(weights).is_file():
        raise CovidlibError(f"--weights {weights}: no such file (valid: imagenet, none, or a weights file path)")
    return str(weights)


def build_model(name: str, *, input_size: int | None = None, weights: str = "none", mode: str = "scratch",
                loss: str | None = None, dropout: float = 0.3):
    """Build architecture ``name`` for ``(S, S, 1)`` grey input. Returns an uncompiled keras.Model."""
    keras = _keras()
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
    x = Preprocess(arch.preprocess, arch.channels, name="preprocess")(inputs)
    if arch.backbone is None:
        x = (_basic_cnn if name == "basic_cnn" else _alexnet)(x, dropout)
    else:
        factory: Callable = getattr(keras.applications, arch.backbone)
        try:
            # one fixed name, so explain.py can find the backbone nested inside the classifier
            backbone = factory(include_top=False, weights=backbone_weights, input_shape=(size, size, 3),
                               name=_BACKBONE)
        except Exception as exc:  # urllib / HTTP / OSError when offline
            if backbone_weights != "imagenet":
                raise CovidlibError(f"--weights {weights}: cannot load into {name} ({type(exc).__name__}: {exc})") from None
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
        x = layers.GlobalAveragePooling2D(name=_POOLING)(x)
        if mode == "frozen":
            # Standardise the pooled features (statistics set from the training split by
            # ``train``): a linear head on a random backbone's raw features, whose scale is
            # ~1e-4, barely moves in 200 epochs (measured: InceptionV3 validation accuracy 63%
            # raw, 89% standardised, on the same cached features).
            x = layers.Normalization(axis=-1, name=_FEATURE_NORM)(x)
        x = layers.Dropout(dropout, name="head_dropout")(x)
    units, activation = (1, "sigmoid") if loss == "binary" else (2, "softmax")
    outputs = layers.Dense(units, activation=activation, dtype="float32", name=_CLASSIFIER)(x)
    return keras.Model(inputs, outputs, name=name)


# --- the model contract: a model's parts by accessor; only here are their names known ------

_BACKBONE, _POOLING, _FEATURE_NORM, _CLASSIFIER = "backbone", "gap", "feature_norm", "head"


def _part(model, name: str):
    try:
        return model.get_layer(name)
    except ValueError:
        return None


def backbone(model):
    """The keras.applications backbone (a nested model); None for the two hand-built CNNs."""
    return _part(model, _BACKBONE)


def pooling(model):
    """The global-average-pooling layer over the backbone's maps; None without one (the hand-built CNNs)."""
    return _part(model, _POOLING)


def feature_norm(model):
    """The standardisation of pooled features (frozen models only; set from the training split)."""
    return _part(model, _FEATURE_NORM)


def classifier(model):
    """The final dense layer (sigmoid or softmax), always in float32."""
    return model.get_layer(_CLASSIFIER)


def head_layers(model) -> list:
    """Everything after pooling: [Normalization,] Dropout, Dense. Affine at inference."""
    return model.layers[model.layers.index(pooling(model)) + 1:]


def head_model(model, feature_dim: int):
    """The head after pooling as its own model over cached features; it shares the layer objects,
    so adapting or training it changes the full model too."""
    keras = _keras()
    inputs = keras.Input((feature_dim,), name="features")
    x = inputs
    for layer in head_layers(model):
        x = layer(x)
    return keras.Model(inputs, x, name=f"{model.name}_head")


def redraw_head(model, seed: int) -> None:
    """Draw the head's weights afresh from ``seed``, keeping the backbone. Keras initialisers fix
    their seed when made, so each is remade with the new one (calling the old one repeats its draw)."""
    for i, layer in enumerate(head_layers(model)):
        for name in ("kernel", "bias"):
            variable, initializer = getattr(layer, name, None), getattr(layer, f"{name}_initializer", None)
            if variable is None or initializer is None:
                continue
            config = initializer.get_config()
            if "seed" in config:
                config["seed"] = seed * 1_000 + i
            fresh = type(initializer).from_config(config)
            variable.assign(fresh(variable.shape, dtype=variable.dtype))


def feature_model(model):
    """Image -> pooled backbone features (the frozen part of a ``frozen`` run)."""
    keras = _keras()
    return keras.Model(model.inputs, pooling(model).output, name=f"{model.name}_features")


def unfreeze_top(model, fraction: float) -> int:
    """Make the top ``fraction`` of the backbone's layers trainable (BatchNorm stays frozen)."""
    keras = _keras()
    bb = backbone(model)
    bb.trainable = True
    cut = int(len(bb.layers) * (1 - fraction))
    for i, layer in enumerate(bb.layers):
        layer.trainable = i >= cut and not isinstance(layer, keras.layers.BatchNormalization)
    return sum(layer.trainable for layer in bb.layers)


def loss_and_target(loss: str):
    """Keras loss object and the label format ``tf_dataset`` must produce for it."""
    keras = _keras()
    return {
        "binary": (keras.losses.BinaryCrossentropy(), "binary"),
        "sparse": (keras.losses.SparseCategoricalCrossentropy(), "sparse"),
        "categorical": (keras.losses.CategoricalCrossentropy(), "onehot"),
    }[loss]


def covid_probability(outputs: np.ndarray) -> np.ndarray:
    """P(COVID) from a model's outputs, whichever head it has."""
    outputs = np.asarray(outputs, dtype=np.float64)
    return outputs[:, 0] if outputs.shape[-1] == 1 else outputs[:, 1]


def load_model(path: str | Path, compile: bool = False):
    """Load a saved covidlib model (registers the custom layer first); ``compile`` restores the
    optimizer state too (a training checkpoint)."""
    keras = _keras()
    _preprocess_layer()
    path = Path(path)
    if not path.exists():
        raise CovidlibError(f"model file {path} does not exist")
    try:
        return keras.models.load_model(path, compile=compile)
    except Exception as exc:  # Keras raises many kinds for a truncated or foreign file
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise CovidlibError(f"model file {path} cannot be loaded ({reason})") from None


def count_flops(model) -> int:
    """Floating-point operations of one forward pass on one image (TensorFlow's profiler).

    Multiply and add count separately (a KxK conv costs 2*K*K*Cin per output value).
    """
    from covidlib.runtime import tf

    t = tf()
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2
    from tensorflow.python.profiler.model_analyzer import profile
    from tensorflow.python.profiler.option_builder import ProfileOptionBuilder

    spec = t.TensorSpec([1, *model.input_shape[1:]], t.float32)
    concrete = t.function(lambda x: model(x, training=False)).get_concrete_function(spec)
    graph = convert_variables_to_constants_v2(concrete).graph
    opts = ProfileOptionBuilder(ProfileOptionBuilder.float_operation()).with_empty_output().build()
    return int(profile(graph, options=opts).total_float_ops)
