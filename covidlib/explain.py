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

import numpy as np

from covidlib import CovidlibError
from covidlib.models import backbone, head_layers, pooling

METHODS = ("cam", "gradcam", "gradcam++", "saliency", "smoothgrad", "activations", "heatmaps")
MAP_METHODS = ("cam", "gradcam", "gradcam++", "saliency", "smoothgrad")
# Bumped whenever the maps change for the same model and image, so stored galleries are remade.
MAPS_VERSION = 3  # 2: gradients of the class score before sigmoid/softmax; 3: CAM through the whole head (feature_norm)
CLASSES = {"covid": 1, "non-covid": 0}
LAYER_KINDS = ("Conv2D", "MaxPooling2D", "Dropout", "DepthwiseConv2D")


def _keras():
    from covidlib.runtime import tf

    tf()
    import keras

    return keras


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
        if isinstance(layer, _keras().Model):
            names += [f"{layer.name}/{inner.name}" for inner in layer.layers if _is_spatial(inner)]
            if _is_spatial(layer):
                names.append(layer.name)
        elif _is_spatial(layer) and layer.name != "preprocess":
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
        keras = _keras()
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
            if isinstance(layer, _keras().layers.InputLayer):
                continue
            if self.inner is not None and layer is backbone(self.model):
                outs = self.inner(h, training=False)
                found.update({f"{layer.name}/{n}": o for n, o in zip(self.inner_names, outs[:-1])})
                h = outs[-1]
            elif self.logits and layer is self.model.layers[-1] and _squashes(layer):
                h = _keras().ops.matmul(h, layer.kernel) + layer.bias  # the class score before sigmoid/softmax
            else:
                h = layer(h, training=False)
            if layer.name in self.outer:
                found[layer.name] = h
        return [found[n] for n in self.layers], h


def _squashes(layer) -> bool:
    act = getattr(layer, "activation", None)
    return getattr(act, "__name__", "") in ("sigmoid", "softmax") and getattr(layer, "bias", None) is not None


def _score(logits, class_index):
    """The scalar per image whose gradient we explain: the class score before sigmoid/softmax.

    As in Selvaraju et al.: the probability saturates on slices the model is sure of
    (float32 P = 1.0 exactly), its gradient is then zero and the map comes out blank. For
    one sigmoid unit the non-COVID score is minus the logit. ``class_index`` (0 or 1) may be a float
    tensor, so one traced function serves both classes (an integer tensor makes TensorFlow's oneDNN
    build log a line on stderr, which would reach the notebook pages).
    """
    if logits.shape[-1] == 1:
        return logits[:, 0] * (2.0 * class_index - 1.0)
    return logits[:, 1] * class_index + logits[:, 0] * (1.0 - class_index)


def _as_batch(images) -> np.ndarray:
    x = np.asarray(images, dtype=np.float32)
    if x.ndim == 3:
        x = x[None]
    if x.ndim == 2:
        x = x[None, ..., None]
    return x


def _upsample(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    import cv2

    out = np.stack([cv2.resize(m.astype(np.float32), (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
                    for m in maps])
    return _normalise(out)


def _normalise(maps: np.ndarray) -> np.ndarray:
    maps = np.maximum(maps, 0)
    top = maps.reshape(len(maps), -1).max(axis=1).reshape(-1, 1, 1)
    return np.where(top > 0, maps / np.where(top > 0, top, 1), 0.0)


def _traced(model, key, build):
    """The model's traced gradient function for ``key``, built once: tracing a deep model costs
    tens of seconds on a CPU, and the explorer asks again at every click."""
    cache = model.__dict__.setdefault("_covidlib_grad_fns", {})
    if key not in cache:
        cache[key] = build()
    return cache[key]


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
    from covidlib.runtime import tf

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
                scaled = t.cast(_score(out, class_index), t.float32) * scale
            grads = tape.gradient(scaled, [*acts, z])
            return [t.cast(a, t.float32) for a in acts], [t.cast(g, t.float32) / scale for g in grads]

        return fn

    fn = _traced(model, layers, build)
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
    from covidlib.runtime import tf

    t = tf()
    head = head_layers(model)
    v = t.zeros((1, channels))
    with t.GradientTape() as tape:
        tape.watch(v)
        h = v
        for layer in head:
            if layer is model.layers[-1] and _squashes(layer):
                h = t.matmul(h, layer.kernel) + layer.bias
            else:
                h = layer(h, training=False)
        score = _score(h, class_index)
    return np.asarray(tape.gradient(score, v), dtype=np.float64)[0]


_MAPS: dict[str, MapMethod] = {m.name: m for m in (CAM(), GradCAM(), GradCAMPlusPlus(), Saliency(), SmoothGrad())}
cam, gradcam, gradcam_plus_plus, saliency, smoothgrad = (_MAPS[n] for n in MAP_METHODS)


def explain(model, images, method: str, *, layer: str | None = None, class_name: str = "covid") -> np.ndarray:
    """One entry point for the map methods (what the CLI and the explorer call)."""
    if method not in _MAPS:
        raise CovidlibError(f"unknown method {method!r}; valid: {', '.join(MAP_METHODS)}")
    return _MAPS[method](model, images, layer=layer, class_name=class_name)


def _class(name: str) -> int:
    if name not in CLASSES:
        raise CovidlibError(f"unknown class {name!r}; valid: {', '.join(CLASSES)}")
    return CLASSES[name]


# --- per-layer maps (the paper's figures 7-8 and 10-11) ------------------------------------


def feature_map_layers(model) -> list[str]:
    """Every Conv2D, MaxPooling2D and Dropout layer with spatial output, in order."""
    keras = _keras()
    kinds = tuple(getattr(keras.layers, k) for k in LAYER_KINDS)
    out = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            out += [f"{layer.name}/{i.name}" for i in layer.layers if isinstance(i, kinds) and _is_spatial(i)]
        elif isinstance(layer, kinds) and _is_spatial(layer):
            out.append(layer.name)
    return out


def activations(model, image, layers: list[str] | None = None) -> dict[str, np.ndarray]:
    """Feature maps ``(H, W, C)`` of one image at each requested layer."""
    layers = layers or feature_map_layers(model)
    for name in layers:
        _check_layer(model, name)
    maps, _ = _Forward(model, layers)(_as_batch(image))
    return {n: np.asarray(m)[0] for n, m in zip(layers, maps)}


def heatmap(feature_maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A layer's activations collapsed to one map: mean absolute activation over channels."""
    return _upsample(np.abs(feature_maps).mean(axis=-1)[None], size)[0]


def overlay(gray: np.ndarray, heat: np.ndarray, alpha: float = 0.45, colormap: str = "jet") -> np.ndarray:
    """RGB uint8: the slice in grey with ``heat`` (in [0, 1]) coloured by an OpenCV colormap on top."""
    import cv2

    gray = np.asarray(gray)
    gray = gray[..., 0] if gray.ndim == 3 else gray
    gray = np.clip(gray, 0, 255).astype(np.uint8)
    code = getattr(cv2, f"COLORMAP_{colormap.upper()}", None)
    if code is None:
        raise CovidlibError(f"unknown colormap {colormap!r} (any OpenCV COLORMAP_* name, e.g. jet, inferno, turbo)")
    heat = cv2.resize(np.asarray(heat, np.float32), (gray.shape[1], gray.shape[0]))
    colour = cv2.cvtColor(cv2.applyColorMap(np.uint8(255 * np.clip(heat, 0, 1)), code), cv2.COLOR_BGR2RGB)
    base = cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB)
    return cv2.addWeighted(colour, float(alpha), base, 1 - float(alpha), 0)


def feature_grid(feature_maps: np.ndarray, max_channels: int = 16) -> np.ndarray:
    """Up to ``max_channels`` channels tiled into one grey uint8 image (figures 7-8)."""
    c = min(max_channels, feature_maps.shape[-1])
    cols = int(np.ceil(np.sqrt(c)))
    rows = int(np.ceil(c / cols))
    h, w = feature_maps.shape[:2]
    grid = np.zeros((rows * (h + 1), cols * (w + 1)), np.uint8)
    for k in range(c):
        m = feature_maps[..., k].astype(np.float64)
        m = (m - m.min()) / (m.max() - m.min() or 1.0)
        r, q = divmod(k, cols)
        grid[r * (h + 1) : r * (h + 1) + h, q * (w + 1) : q * (w + 1) + w] = np.uint8(255 * m)
    return grid


# --- sanity and faithfulness ---------------------------------------------------------------


def randomisation_test(model, images, method: str = "gradcam", *, class_name: str = "covid", seed: int = 0,
                       layer: str | None = None, stages: tuple[int, ...] | None = None) -> list[dict]:
    """Cascading randomisation: re-draw weights from the top layer down, comparing maps each step.

    ``stages`` are the numbers of weighted layers re-drawn (from the top) at which maps are
    compared; by default after every layer. Each row has the mean Spearman rank correlation
    between the trained model's maps and the randomised model's, the per-image values, and
    the share of randomised maps that came out blank (constant). High correlation after the
    weights are gone means the method shows the image, not the model. The weights are
    re-drawn in place and restored afterwards, so the model's traced gradient function is
    reused (a second trace of a deep model costs tens of seconds on a CPU).
    """
    reference = explain(model, images, method, layer=layer, class_name=class_name)
    rng = np.random.default_rng(seed)
    weighted = [layer_ for layer_ in reversed(_flat_layers(model)) if layer_.get_weights()]
    wanted = set(stages or range(1, len(weighted) + 1))
    saved = model.get_weights()
    rows = []
    try:
        for k, layer_ in enumerate(weighted, start=1):
            layer_.set_weights([_redraw(w, rng) for w in layer_.get_weights()])
            if k not in wanted and k != len(weighted) or k > max(wanted):
                continue
            maps = explain(model, images, method, layer=layer, class_name=class_name)
            rho = [rank_similarity(a, b) for a, b in zip(reference, maps)]
            rows.append({"randomised_down_to": layer_.name, "layers_randomised": k, "spearman": float(np.mean(rho)),
                         "spearman_per_image": rho, "blank_maps": float(np.mean([np.ptp(m) == 0 for m in maps]))})
            if k >= max(wanted):
                break
    finally:
        model.set_weights(saved)
    return rows


def cascade_stages(model, fractions=(0.0, 0.5, 1.0)) -> tuple[int, ...]:
    """Layer counts for :func:`randomisation_test`: the top layer alone (fraction 0), then the given
    shares of the model's weighted layers, so deep and shallow models are compared at like depths."""
    n = sum(1 for layer_ in _flat_layers(model) if layer_.get_weights())
    return tuple(sorted({max(1, round(f * n)) for f in fractions}))


def rank_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman correlation of two maps; 0 when either is constant.

    Randomised weights often leave Grad-CAM all zero after its ReLU. A constant map carries
    no ranking, so it shares none with the trained map (scipy would say NaN, and a mean
    of NaNs hides the result).
    """
    from scipy.stats import spearmanr

    a, b = np.ravel(a), np.ravel(b)
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(spearmanr(a, b).statistic)


def _flat_layers(model) -> list:
    keras = _keras()
    out = []
    for layer in model.layers:
        out += _flat_layers(layer) if isinstance(layer, keras.Model) else [layer]
    return out


def _redraw(w: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    scale = float(np.std(w)) or 0.05
    return rng.normal(0.0, scale, w.shape).astype(w.dtype)


FILLS = ("black", "blur")


def fill_image(image: np.ndarray, fill: str) -> np.ndarray:
    """What a deleted pixel becomes. ``black``: zero, as in Petsiuk et al.; ``blur``: the image under
    a wide Gaussian blur, so a deletion removes detail without drawing new sharp edges the model
    may react to (the concern behind ROAD, Rong et al. 2022)."""
    from scipy.ndimage import gaussian_filter

    if fill == "black":
        return np.zeros_like(image)
    if fill == "blur":
        sigma = max(image.shape[:2]) / 16
        return gaussian_filter(image, sigma=(sigma, sigma) + (0,) * (image.ndim - 2))
    raise CovidlibError(f"unknown fill {fill!r}; valid: {', '.join(FILLS)}")


def deletion_insertion(model, images, heats, *, class_name: str = "covid", steps: int = 20, seed: int = 0,
                       fill: str = "black", kinds: tuple[str, ...] = ("deletion", "insertion"),
                       chunk: int = 512) -> list[dict]:
    """Per image: area under P(class) as the most salient pixels are deleted (set to ``fill``) or
    inserted (into the ``fill`` image).

    A faithful map has a low deletion AUC and a high insertion AUC; the same numbers
    for a random order (each image its own, drawn from ``seed``) are returned alongside as the
    baseline. The perturbed copies of all the images go through the model together, at most
    ``chunk`` at a time (a ``predict`` per image cost 0.3-0.4 s of overhead each on a CPU).
    """
    if not kinds or set(kinds) - {"deletion", "insertion"}:
        raise CovidlibError(f"kinds must be deletion and/or insertion, got {kinds!r}")

    x, heats = _as_batch(images), np.asarray(heats).reshape(-1, *np.shape(heats)[-2:])
    rng = np.random.default_rng(seed)
    orders = [[np.argsort(-m.ravel(), kind="stable") for m in (heat, rng.random(heat.shape))] for heat in heats]
    per_image = 2 * (steps + 1) * len(kinds)
    group = max(1, chunk // per_image)
    p = np.concatenate([_probabilities(model, np.concatenate([_perturbed(img, o, fill, steps, kinds)
                                                              for img, o in zip(x[i:i + group], orders[i:i + group])]))
                        for i in range(0, len(x), group)])
    p = (p if _class(class_name) == 1 else 1 - p).reshape(len(x), 2, steps + 1, len(kinds))  # image, order, step, kind
    auc = np.trapezoid(p, dx=1.0 / steps, axis=2)
    return [{f"{kind}_auc_{name}": float(auc[n, i, j]) for i, name in enumerate(("map", "random"))
             for j, kind in enumerate(kinds)} for n in range(len(x))]


def _perturbed(image: np.ndarray, orders, fill: str, steps: int, kinds) -> np.ndarray:
    """Every step of every curve for one image: (order, step, kind) flattened, float32."""
    filled = fill_image(image, fill)
    batch = []
    for order in orders:
        for k in np.linspace(0, order.size, steps + 1).astype(int):
            mask = np.zeros(order.size, bool)
            mask[order[:k]] = True
            mask = mask.reshape(image.shape[:2])[..., None]
            batch += [np.where(mask, filled, image) if kind == "deletion" else np.where(mask, image, filled)
                      for kind in kinds]
    return np.stack(batch).astype(np.float32)


def _probabilities(model, x: np.ndarray, batch: int = 64) -> np.ndarray:
    """P(COVID) through one traced forward pass per model, for any batch size: ``predict`` builds an
    iterator at every call and traces again for a short last batch (seconds each for a deep model)."""
    from covidlib.models import covid_probability
    from covidlib.runtime import tf

    t = tf()

    def build():
        return t.function(lambda z: model(z, training=False),
                          input_signature=[t.TensorSpec((None, *model.input_shape[1:]), t.float32)])

    forward = _traced(model, "probabilities", build)
    return np.concatenate([covid_probability(np.asarray(forward(x[i:i + batch]))) for i in range(0, len(x), batch)])
