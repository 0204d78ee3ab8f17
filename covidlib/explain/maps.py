"""Where does a model look? CAM, Grad-CAM, Grad-CAM++, saliency, per-layer maps, sanity checks.

All maps are float arrays in [0, 1] at the input's size, one per image. The target layer
is found automatically (the last layer with spatial maps, looking inside a nested
``backbone``) or named: ``"conv3"`` at the top level, ``"backbone/conv5_block3_out"``
inside the backbone.

Sanity checks follow Adebayo et al. 2018 (model randomisation: a map that survives
randomised weights explains nothing about the weights) and Petsiuk et al. 2018
(deletion / insertion: removing the most salient pixels first should hurt the score
faster than removing random ones).
"""

from __future__ import annotations

import cv2
import numpy as np

from covidlib import CovidlibError, runtime
from covidlib.models.contract import (
    backbone,
    class_score,
    head_layers,
    is_classifier,
    is_preprocessing,
    pooling,
    pre_activation,
    traced,
)
from covidlib.runtime import tf
from covidlib.vocabulary import CLASS_KEYS

METHODS = ("cam", "gradcam", "gradcam++", "saliency", "smoothgrad", "activations", "heatmaps")
MAP_METHODS = ("cam", "gradcam", "gradcam++", "saliency", "smoothgrad")
# Bumped whenever the maps change for the same model and image, so stored galleries are remade.
MAPS_VERSION = 3  # 2: gradients of the class score before sigmoid/softmax; 3: CAM through the whole head (feature_norm)
LAYER_KINDS = ("Conv2D", "MaxPooling2D", "Dropout", "DepthwiseConv2D")


def _is_spatial(layer) -> bool:
    try:
        shape = layer.output.shape
    except (AttributeError, ValueError):
        return False
    return len(shape) == 4 and shape[1] is not None and shape[1] > 1


def spatial_layers(model) -> list[str]:
    """Names of every layer with spatial maps, backbone layers as ``backbone/NAME``."""
    names = []
    for layer in model.layers:
        if isinstance(layer, runtime.keras().Model):
            names += [f"{layer.name}/{inner.name}" for inner in layer.layers if _is_spatial(inner)]
            if _is_spatial(layer):
                names.append(layer.name)
        elif _is_spatial(layer) and not is_preprocessing(layer):
            names.append(layer.name)
    return names


def find_target_layer(model) -> str:
    """The last layer with spatial feature maps (inside a nested backbone if there is one)."""
    names = [n for n in spatial_layers(model) if "/" in n] or spatial_layers(model)
    if not names:
        raise CovidlibError(f"model {model.name} has no layer with spatial feature maps")
    return names[-1]


def _check_layer(model, layer: str) -> None:
    valid = spatial_layers(model)
    if layer not in valid:
        shown = ", ".join(valid[-8:])
        raise CovidlibError(f"unknown layer {layer!r} for {model.name}; valid (last 8 of {len(valid)}): {shown}")


class _Forward:
    """Run a model's top-level chain of layers, also returning chosen intermediate maps.
    Keras cannot wire a nested backbone's inner tensors to the outer input, so we call
    the top-level layers one after another and swap the backbone for a model that also
    returns the inner maps. covidlib's models are chains at the top level.
    """
    def __init__(self, model, layers: list[str], logits: bool = False):
        keras = runtime.keras()
        self.model = model
        self.logits = logits
        self.layers = layers
        self.outer = [n for n in layers if "/" not in n]
        self.inner_names = [n.split("/", 1)[1] for n in layers if "/" in n]
        self.inner = None
        if self.inner_names:
            bb = backbone(model)
            self.inner = keras.Model(bb.inputs, [*(bb.get_layer(n).output for n in self.inner_names), bb.output])

    def __call__(self, x):
        found = {}
        h = x
        for layer in self.model.layers:
            if isinstance(layer, runtime.keras().layers.InputLayer):
                continue
            if self.inner is not None and layer is backbone(self.model):
                outs = self.inner(h, training=False)
                found.update({f"{layer.name}/{n}": o for n, o in zip(self.inner_names, outs[:-1])})
                h = outs[-1]
            elif self.logits and is_classifier(self.model, layer):
                h = pre_activation(layer, h)  # the class score before sigmoid/softmax
            else:
                h = layer(h, training=False)
            if layer.name in self.outer:
                found[layer.name] = h
        return [found[n] for n in self.layers], h


def _as_batch(images) -> np.ndarray:
    x = np.asarray(images, dtype=np.float32)
    if x.ndim == 3:
        x = x[None]
    if x.ndim == 2:
        x = x[None, ..., None]
    return x


def _upsample(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:

    out = np.stack([cv2.resize(m.astype(np.float32), (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
                    for m in maps])
    return _normalise(out)


def _normalise(maps: np.ndarray) -> np.ndarray:
    maps = np.maximum(maps, 0)
    top = maps.reshape(len(maps), -1).max(axis=1).reshape(-1, 1, 1)
    return np.where(top > 0, maps / np.where(top > 0, top, 1), 0.0)


def _mixed(model) -> bool:
    return any(getattr(layer, "compute_dtype", "float32") == "float16" for layer in model.layers)


# Mixed-precision models backpropagate in float16, whose small gradients underflow to zero (a
# blank map); the score is scaled up first, as mixed-precision training scales its loss, and the
# gradients are cast to float32 and scaled back. Maps are normalised, so the scale cannot show.
_GRAD_SCALE = 1024.0


def _map_layers(model, layer: str | None) -> tuple[str, ...]:
    """The layers whose maps one traced function returns: the named one, else every layer a method
    targets by default (Grad-CAM's last spatial layer and, with a pooling head, CAM's backbone output)."""
    if layer is not None:
        _check_layer(model, layer)
        return (layer,)
    cam = [backbone(model).name] if backbone(model) is not None and pooling(model) is not None else []
    return tuple(dict.fromkeys([find_target_layer(model), *cam]))


# Batches are padded to 1, 2, 4, ... 32 images: each shape is traced once, and a traced shape with an
# unknown batch size makes TensorFlow's oneDNN build log an error line (DenseNet's concat gradient)
# that would reach the notebook pages.
_MAX_BATCH = 32


def _gradients(model, layer: str | None, x: np.ndarray, class_index: int) -> tuple[dict, np.ndarray]:
    """({layer: (maps, d score / d maps)}, d score / d image) for a batch, all float32.
    One traced function per model serves every map method and both classes (the class is a
    tensor argument): tracing the backward pass of a deep model costs 7-10 s on a CPU, and the
    gallery, the sanity checks and the explorer ask for several methods and classes of one model.
    """
    t = tf()
    layers = _map_layers(model, layer)
    scale = _GRAD_SCALE if _mixed(model) else 1.0

    def build():
        forward = _Forward(model, list(layers), logits=True)

        @t.function
        def fn(z, class_index):
            with t.GradientTape() as tape:
                tape.watch(z)
                acts, out = forward(z)
                scaled = t.cast(class_score(out, class_index), t.float32) * scale
            grads = tape.gradient(scaled, [*acts, z])
            return [t.cast(a, t.float32) for a in acts], [t.cast(g, t.float32) / scale for g in grads]

        return fn

    fn = traced(model, layers, build)
    size = min(_MAX_BATCH, 1 << (len(x) - 1).bit_length())
    parts = []
    for i in range(0, len(x), size):
        chunk = x[i:i + size]
        padded = np.concatenate([chunk, np.zeros((size - len(chunk), *x.shape[1:]), x.dtype)])
        acts, grads = fn(t.constant(padded), t.constant(class_index, t.float32))
        parts.append([np.asarray(v)[:len(chunk)] for v in (*acts, *grads)])
    out = [np.concatenate(column) for column in zip(*parts)]
    maps = {name: (out[k], out[len(layers) + k]) for k, name in enumerate(layers)}
    return maps, out[-1]


class MapMethod:
    """One place for what every map shares: the target class, the replayed forward pass, the
    score (before sigmoid/softmax), and upsampling to the input with normalisation to [0, 1].

    A method overrides one step, as in pytorch-grad-cam's BaseCAM: ``maps`` (raw maps at any
    resolution), or for the CAM family only ``cam_weights``.
    """
    name = ""

    def __call__(self, model, images, *, layer: str | None = None, class_name: str = "covid") -> np.ndarray:
        class_index = _class(class_name)
        x = _as_batch(images)
        return _upsample(self.maps(model, x, layer, class_index), x.shape[1:3])

    def maps(self, model, x: np.ndarray, layer: str | None, class_index: int) -> np.ndarray:
        raise NotImplementedError


class WeightedMaps(MapMethod):
    """The CAM family: a weighted sum of one layer's feature maps, weights per image and channel."""
    def target_layer(self, model, layer: str | None) -> str:
        layer = layer or find_target_layer(model)
        _check_layer(model, layer)
        return layer

    def maps(self, model, x, layer, class_index):
        target = self.target_layer(model, layer)
        act, grads = (v.astype(np.float64) for v in _gradients(model, layer and target, x, class_index)[0][target])
        return np.einsum("bhwc,bc->bhw", act, self.cam_weights(model, act, grads, class_index))

    def cam_weights(self, model, act: np.ndarray, grads: np.ndarray, class_index: int) -> np.ndarray:
        raise NotImplementedError


class GradCAM(WeightedMaps):
    """Grad-CAM (Selvaraju et al. 2017): the mean gradient of the score over each map."""
    name = "gradcam"

    def cam_weights(self, model, act, grads, class_index):
        return grads.mean(axis=(1, 2))


class GradCAMPlusPlus(WeightedMaps):
    """Grad-CAM++ (Chattopadhay et al. 2018): positive gradients weighted per position."""
    name = "gradcam++"

    def cam_weights(self, model, act, grads, class_index):
        g2, g3 = grads**2, grads**3
        denom = 2 * g2 + act.sum(axis=(1, 2), keepdims=True) * g3
        alpha = g2 / np.where(denom != 0, denom, 1.0)
        return (alpha * np.maximum(grads, 0)).sum(axis=(1, 2))


class CAM(WeightedMaps):
    """Class activation mapping (Zhou et al. 2016): the head's weights on the backbone's maps.
    The weights are those of the whole head after pooling (standardisation included); its
    constant shift is left out, as Zhou et al. leave out the bias. CAM then equals Grad-CAM
    on the backbone's output.
    """
    name = "cam"

    def target_layer(self, model, layer):
        if pooling(model) is None:
            raise CovidlibError(f"CAM needs a global-average-pooling head; {model.name} has none (use gradcam)")
        return backbone(model).name

    def cam_weights(self, model, act, grads, class_index):
        return np.broadcast_to(_head_weights(model, act.shape[-1], class_index), (len(act), act.shape[-1]))


class Saliency(MapMethod):
    """|d score / d pixel| (Simonyan et al. 2014), the largest over channels."""
    name = "saliency"

    def maps(self, model, x, layer, class_index):
        return np.abs(self.gradients(lambda z: _gradients(model, None, z, class_index)[1], x)).max(axis=-1)

    def gradients(self, fn, x: np.ndarray) -> np.ndarray:
        return fn(x)


class SmoothGrad(Saliency):
    """SmoothGrad (Smilkov et al. 2017): saliency averaged over noisy copies of the image."""
    name = "smoothgrad"
    samples, noise, seed = 20, 0.15, 0

    def gradients(self, fn, x):
        rng = np.random.default_rng(self.seed)
        sigma = self.noise * (x.max() - x.min() or 1.0)
        return np.mean([fn(x + rng.normal(0, sigma, x.shape).astype(np.float32)) for _ in range(self.samples)],
                       axis=0)


def _head_weights(model, channels: int, class_index: int) -> np.ndarray:
    """Each pooled channel's weight in the class score: the gradient of the head after pooling.
    In a frozen model the head is Normalization -> Dropout (inert) -> Dense, in a scratch model
    Dropout -> Dense: affine either way, so its gradient is the same at every input (w_k / sigma_k
    for a standardised head) and is taken through the model's own layers, as MONAI's
    ``CAM(fc_layers=...)`` applies the head itself.
    """
    t = tf()
    head = head_layers(model)
    v = t.zeros((1, channels))
    with t.GradientTape() as tape:
        tape.watch(v)
        h = v
        for layer in head:
            if is_classifier(model, layer):
                h = pre_activation(layer, h)
            else:
                h = layer(h, training=False)
        score = class_score(h, class_index)
    return np.asarray(tape.gradient(score, v), dtype=np.float64)[0]


_MAPS: dict[str, MapMethod] = {m.name: m for m in (CAM(), GradCAM(), GradCAMPlusPlus(), Saliency(), SmoothGrad())}
cam, gradcam, gradcam_plus_plus, saliency, smoothgrad = (_MAPS[n] for n in MAP_METHODS)


def supported_methods(model, methods=MAP_METHODS) -> list[str]:
    """``methods`` less those ``model`` cannot draw: CAM needs pooling before the head."""
    return [m for m in methods if m != "cam" or pooling(model) is not None]


def explain(model, images, method: str, *, layer: str | None = None, class_name: str = "covid") -> np.ndarray:
    """One entry point for the map methods (what the CLI and the explorer call)."""
    if method not in _MAPS:
        raise CovidlibError(f"unknown method {method!r}; valid: {', '.join(MAP_METHODS)}")
    return _MAPS[method](model, images, layer=layer, class_name=class_name)


def _class(name: str) -> int:
    if name not in CLASS_KEYS:
        raise CovidlibError(f"unknown class {name!r}; valid: {', '.join(CLASS_KEYS)}")
    return CLASS_KEYS[name]


