"""The model contract: a model's parts by accessor, its class score and P(COVID); only here are the parts' names known."""

from __future__ import annotations

import functools
import zipfile
from pathlib import Path

import numpy as np

from covidlib import CovidlibError, runtime
from covidlib.runtime import tf

# The names the builders give a model's parts; nothing outside this module and the builders uses them.
BACKBONE, POOLING, FEATURE_NORM, CLASSIFIER, PREPROCESSING = "backbone", "gap", "feature_norm", "head", "preprocess"
PREPROCESS = ("unit", "tf", "caffe", "torch")
# ImageNet statistics used by keras.applications' "caffe" (BGR means) and "torch" modes.
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)

@functools.cache  # one registered Preprocess class per process, however many models are built
def _preprocess_layer():
    keras = runtime.keras()
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


# --- the model contract: a model's parts by accessor; only here are their names known ------



def _part(model, name: str):
    try:
        return model.get_layer(name)
    except ValueError:
        return None


def backbone(model):
    """The keras.applications backbone (a nested model); None for the two hand-built CNNs."""
    return _part(model, BACKBONE)


def pooling(model):
    """The global-average-pooling layer over the backbone's maps; None without one (the hand-built CNNs)."""
    return _part(model, POOLING)


def feature_norm(model):
    """The standardisation of pooled features (frozen models only; set from the training split)."""
    return _part(model, FEATURE_NORM)


def classifier(model):
    """The final dense layer (sigmoid or softmax), always in float32."""
    return model.get_layer(CLASSIFIER)


def head_layers(model) -> list:
    """Everything after pooling: [Normalization,] Dropout, Dense. Affine at inference."""
    return model.layers[model.layers.index(pooling(model)) + 1:]


def head_model(model, feature_dim: int):
    """The head after pooling as its own model over cached features; it shares the layer objects,
    so adapting or training it changes the full model too."""
    keras = runtime.keras()
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
    keras = runtime.keras()
    return keras.Model(model.inputs, pooling(model).output, name=f"{model.name}_features")


def unfreeze_top(model, fraction: float) -> int:
    """Make the top ``fraction`` of the backbone's layers trainable (BatchNorm stays frozen)."""
    keras = runtime.keras()
    bb = backbone(model)
    bb.trainable = True
    cut = int(len(bb.layers) * (1 - fraction))
    for i, layer in enumerate(bb.layers):
        layer.trainable = i >= cut and not isinstance(layer, keras.layers.BatchNormalization)
    return sum(layer.trainable for layer in bb.layers)


def loss_and_target(loss: str):
    """Keras loss object and the label format ``tf_dataset`` must produce for it."""
    keras = runtime.keras()
    return {
        "binary": (keras.losses.BinaryCrossentropy(), "binary"),
        "sparse": (keras.losses.SparseCategoricalCrossentropy(), "sparse"),
        "categorical": (keras.losses.CategoricalCrossentropy(), "onehot"),
    }[loss]


def covid_probability(outputs: np.ndarray) -> np.ndarray:
    """P(COVID) from a model's outputs, whichever head it has."""
    outputs = np.asarray(outputs, dtype=np.float64)
    return outputs[:, 0] if outputs.shape[-1] == 1 else outputs[:, 1]


def class_score(logits, class_index):
    """The scalar per image whose gradient a map explains: the class score before sigmoid/softmax.

    As in Selvaraju et al.: the probability saturates on slices the model is sure of
    (float32 P = 1.0 exactly), its gradient is then zero and the map comes out blank. For
    one sigmoid unit the non-COVID score is minus the logit. ``class_index`` (0 or 1) may be a float
    tensor, so one traced function serves both classes (an integer tensor makes TensorFlow's oneDNN
    build log a line on stderr, which would reach the notebook pages).
    """
    if logits.shape[-1] == 1:
        return logits[:, 0] * (2.0 * class_index - 1.0)
    return logits[:, 1] * class_index + logits[:, 0] * (1.0 - class_index)


def is_classifier(model, layer) -> bool:
    """True for the final dense layer, whose output a map takes before its sigmoid/softmax."""
    return layer is classifier(model)


def pre_activation(layer, h):
    """The classifier's output before its sigmoid/softmax (the class logits)."""
    keras = runtime.keras()
    return keras.ops.matmul(h, layer.kernel) + layer.bias


def is_preprocessing(layer) -> bool:
    """The layer that turns grey 0..255 into what the backbone expects: no feature maps of its own."""
    return layer.name == PREPROCESSING


def traced(model, key: str, build):
    """The model's traced function for ``key``, built once and kept on the model: tracing a deep
    model costs tens of seconds on a CPU, and the explorer asks again at every click."""
    cache = model.__dict__.setdefault("_covidlib_traced", {})
    if key not in cache:
        cache[key] = build()
    return cache[key]


def predict_covid(model, images, batch: int = 64) -> np.ndarray:
    """P(COVID) for a batch of inputs (images, or a frozen head's cached features) through one traced
    forward pass, for any count: the one prediction path of training, evaluation and the maps.
    ``images`` may be a memory-mapped array; ``batch`` rows are read at a time. Keras' ``predict``
    builds an iterator at every call and traces again for a short last batch (seconds each for a
    deep model, a ``predict`` per image cost 0.3-0.4 s)."""
    t = runtime.tf()

    def build():
        return t.function(lambda z: model(z, training=False),
                          input_signature=[t.TensorSpec((None, *model.input_shape[1:]), t.float32)])

    forward = traced(model, "forward", build)
    if not len(images):
        return np.zeros(0)
    return np.concatenate([covid_probability(np.asarray(forward(np.asarray(images[i:i + batch], np.float32))))
                           for i in range(0, len(images), batch)])


def reseed_random_layers(models, seed: int, epoch: int) -> None:
    """Put every dropout and augmentation RNG in a state that depends only on (seed, epoch).

    Keras layers draw from SeedGenerators whose state advances with each call; a model loaded
    from a checkpoint (and a rebuilt augmentation pipeline) starts them afresh, so without this
    a resumed run's dropout masks and augmentations differ from the uninterrupted run's.
    """
    keras = runtime.keras()

    i = 0
    for m in models:
        for layer in m._flatten_layers(include_self=True, recursive=True):
            for sg in layer._seed_generators:  # Keras has no public accessor for them
                value = [(seed * 1_000_003 + epoch * 1_009 + i) % 2**31, 0]
                sg.state.assign(keras.ops.convert_to_tensor(value, dtype=sg.state.dtype))
                i += 1


def load_model(path: str | Path, compile: bool = False):
    """Load a saved covidlib model (registers the custom layer first); ``compile`` restores the
    optimizer state too (a training checkpoint)."""
    keras = runtime.keras()
    _preprocess_layer()
    path = Path(path)
    if not path.exists():
        raise CovidlibError(f"model file {path} does not exist")
    if path.suffix == ".keras" and path.is_file() and not zipfile.is_zipfile(path):  # Keras says "File not found"
        raise CovidlibError(f"model file {path} cannot be loaded: it is damaged or truncated (not a .keras zip archive)")
    try:
        return keras.models.load_model(path, compile=compile)
    except Exception as exc:  # Keras raises many kinds for a truncated or foreign file
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise CovidlibError(f"model file {path} cannot be loaded ({reason})") from None


def count_flops(model) -> int:
    """Floating-point operations of one forward pass on one image (TensorFlow's profiler).

    Multiply and add count separately (a KxK conv costs 2*K*K*Cin per output value).
    """
    t = tf()
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2
    from tensorflow.python.profiler.model_analyzer import profile
    from tensorflow.python.profiler.option_builder import ProfileOptionBuilder

    spec = t.TensorSpec([1, *model.input_shape[1:]], t.float32)
    concrete = t.function(lambda x: model(x, training=False)).get_concrete_function(spec)
    graph = convert_variables_to_constants_v2(concrete).graph
    opts = ProfileOptionBuilder(ProfileOptionBuilder.float_operation()).with_empty_output().build()
    return int(profile(graph, options=opts).total_float_ops)
