from __future__ import annotations

import numpy as np
import pytest

from covidlib import CovidlibError
from covidlib.explain.layers import activations, feature_grid, feature_map_layers, heatmap, overlay
from covidlib.explain.maps import (
    MAP_METHODS,
    _Forward,
    _gradients,
    _is_spatial,
    _upsample,
    cam,
    explain,
    find_target_layer,
    gradcam,
)
from covidlib.explain.sanity import (
    SANITY_METHODS,
    _block_order,
    _flat_layers,
    _randomisation_columns,
    _reinitialised,
    cascade_stages,
    deletion_insertion,
    fill_image,
    is_blank,
    map_grid,
    maps_and_grid,
    randomisation_test,
    rank_similarity,
)
from covidlib.models.architectures import ARCHITECTURES, build_model
from covidlib.vocabulary import CLASS_KEYS


def _quadrant_model():
    """Output depends only on the top-left quadrant: everything else is multiplied by 0."""
    import keras

    mask = np.zeros((1, 32, 32, 1), np.float32)
    mask[:, :16, :16] = 1.0
    inputs = keras.Input((32, 32, 1))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Lambda(lambda z: z * mask, name="quadrant")(x)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv",
                            kernel_initializer=keras.initializers.RandomUniform(0.0, 0.5, seed=0))(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(1, activation="sigmoid", kernel_initializer="ones", name="head")(x)
    return keras.Model(inputs, out)


def _mass_in_quadrant(maps):
    return maps[:, :16, :16].sum() / maps.sum()


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "saliency", "smoothgrad"])
def test_maps_point_at_the_only_quadrant_that_matters(method):
    model = _quadrant_model()
    images = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 1))
    maps = explain(model, images, method, layer="conv" if "grad" in method else None)
    assert maps.shape == (4, 32, 32)
    assert _mass_in_quadrant(maps) > 0.9, method


@pytest.fixture(scope="module")
def blob_model():
    """A tiny CNN trained to say whether a bright square is present: the square is the answer."""
    import keras

    rng = np.random.default_rng(0)
    n = 400
    x = rng.uniform(0, 60, (n, 32, 32, 1)).astype(np.float32)
    y = np.arange(n) % 2
    boxes = []
    for i in np.nonzero(y)[0]:
        r, c = rng.integers(0, 24, 2)
        x[i, r : r + 8, c : c + 8] = 230
        boxes.append((i, r, c))
    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 1))
    h = keras.layers.Rescaling(1 / 255.0)(inputs)
    h = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="c1")(h)
    h = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="c2")(h)
    h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    out = keras.layers.Dense(1, activation="sigmoid", name="head")(h)
    model = keras.Model(inputs, out)
    model.compile(keras.optimizers.Adam(0.01), "binary_crossentropy", metrics=["accuracy"])
    hist = model.fit(x, y.astype(np.float32), epochs=15, batch_size=32, verbose=0)
    assert hist.history["accuracy"][-1] > 0.95
    return model, x, boxes


def test_gradcam_finds_the_square_on_a_trained_model(blob_model):
    model, x, boxes = blob_model
    idx = [b[0] for b in boxes[:10]]
    maps = gradcam(model, x[idx], layer="c2")
    hits = 0
    for m, (_, r, c) in zip(maps, boxes[:10]):
        pr, pc = np.unravel_index(np.argmax(m), m.shape)
        hits += (r - 2 <= pr < r + 10) and (c - 2 <= pc < c + 10)
    assert hits >= 9


def test_gradcam_and_saliency_survive_a_saturated_sigmoid(blob_model):
    """A model sure to float32 precision (P == 1.0) has zero dP/dx: the maps must use the logit."""
    import keras

    model, x, boxes = blob_model
    sure = keras.models.clone_model(model)
    sure.set_weights(model.get_weights())
    kernel, bias = sure.get_layer("head").get_weights()
    sure.get_layer("head").set_weights([kernel * 1000, bias * 1000])
    idx = [b[0] for b in boxes[:6]]
    assert (np.asarray(sure(x[idx])) == 1.0).all()  # saturated: the probability has no gradient
    for method in ("gradcam", "saliency"):
        maps = explain(sure, x[idx], method, layer="c2" if method == "gradcam" else None)
        assert all(np.ptp(m) > 0 for m in maps), method  # not blank
        hits = sum((r - 2 <= pr < r + 10) and (c - 2 <= pc < c + 10)
                   for m, (_, r, c) in zip(maps, boxes[:6])
                   for pr, pc in [np.unravel_index(np.argmax(m), m.shape)])
        assert hits >= 5, method


def test_randomising_the_weights_destroys_the_map(blob_model):
    model, x, boxes = blob_model
    idx = [b[0] for b in boxes[:6]]
    rows = randomisation_test(model, x[idx], "gradcam", layer="c2")
    assert [r["randomised_down_to"] for r in rows] == ["head", "c2", "c1"]
    assert rows[-1]["spearman"] < 0.5


def test_randomisation_at_chosen_depths_restores_the_trained_weights(blob_model):
    model, x, boxes = blob_model
    before = [w.copy() for w in model.get_weights()]
    reference = gradcam(model, x[[b[0] for b in boxes[:4]]], layer="c2")
    stages = cascade_stages(model)  # 3 weighted layers: the top one, half (2), all (3)
    rows = randomisation_test(model, x[[b[0] for b in boxes[:4]]], "gradcam", layer="c2", stages=stages)
    assert stages == (1, 2, 3) and [r["layers_randomised"] for r in rows] == [1, 2, 3]
    assert [r["randomised_down_to"] for r in rows] == ["head", "c2", "c1"]
    assert all(len(r["spearman_per_image"]) == 4 for r in rows)
    for w, b in zip(model.get_weights(), before, strict=True):
        np.testing.assert_array_equal(w, b)  # re-drawn in place, then put back
    np.testing.assert_allclose(gradcam(model, x[[b[0] for b in boxes[:4]]], layer="c2"), reference, atol=1e-6)


def test_the_randomisation_rows_count_blank_maps_and_leave_them_out(blob_model, monkeypatch):
    """Known answer: the randomised model's maps for two of six slices come out constant (blank) and
    one more is NaN; the mean correlation is over the other three, never a made-up 0."""
    model, x, boxes = blob_model
    idx = [b[0] for b in boxes[:6]]
    real = explain
    calls = {"n": 0}
    drawn = {}

    def three_blank(m, images, method, **kw):
        maps, grid = real_maps(m, images, method, **kw)
        calls["n"] += 1
        if calls["n"] > 1:  # every randomised step, not the trained reference
            maps[:2] = 0.0
            maps[2, 0, 0] = np.nan
            maps[3:] = drawn[calls["n"]] = np.random.default_rng(calls["n"]).random(maps[3:].shape)  # never constant
        return maps, grid

    real_maps = maps_and_grid
    monkeypatch.setattr("covidlib.explain.sanity.maps_and_grid", three_blank)
    rows = randomisation_test(model, x[idx], "gradcam", layer="c2")
    reference = real(model, x[idx], "gradcam", layer="c2")
    assert [r["blank_maps"] for r in rows] == [3 / 6] * len(rows)
    assert [r["blank_reference"] for r in rows] == [0.0] * len(rows)
    for k, row in enumerate(rows, start=2):
        expected = [rank_similarity(a, b) for a, b in zip(reference[3:], drawn[k])]
        assert row["spearman"] == pytest.approx(np.mean(expected))
        assert np.isnan(row["spearman_per_image"][:3]).all()


def test_rank_similarity_is_spearman_and_nan_for_a_blank_map():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    a, b = rng.random((8, 8)), rng.random((8, 8))
    assert rank_similarity(a, b) == pytest.approx(spearmanr(a.ravel(), b.ravel()).statistic)
    assert rank_similarity(a, a ** 3) == pytest.approx(1.0)
    # Grad-CAM of a randomised model can be all zero after the ReLU: no ranking, so no correlation.
    assert np.isnan(rank_similarity(a, np.zeros_like(a)))
    assert np.isnan(rank_similarity(np.where(a > 0.5, np.nan, a), b))
    assert not is_blank(a) and is_blank(np.ones_like(a)) and is_blank(np.full_like(a, np.inf))


def test_a_batchnorm_model_is_reinitialised_by_its_own_initialisers_and_no_map_goes_blank(small_model):
    """AlexNet has BatchNormalization: re-drawing its moving variances from a normal distribution made
    them negative and every map NaN. Re-initialised, the statistics are reset and every map of every
    method at every depth has a ranking; the trained weights come back afterwards."""
    import keras

    model = small_model("alexnet")
    before = [w.copy() for w in model.get_weights()]
    bn = next(layer for layer in _flat_layers(model) if isinstance(layer, keras.layers.BatchNormalization))
    gamma, beta, mean, var = _reinitialised(bn, np.random.default_rng(0))
    assert (gamma == 1).all() and (beta == 0).all() and (mean == 0).all() and (var == 1).all()
    conv = next(layer for layer in _flat_layers(model) if isinstance(layer, keras.layers.Conv2D))
    a, b = _reinitialised(conv, np.random.default_rng(0))[0], _reinitialised(conv, np.random.default_rng(1))[0]
    assert np.abs(a).max() <= conv.kernel_initializer(conv.kernel.shape).numpy().std() * 4 and not np.allclose(a, b)
    x = np.random.default_rng(0).uniform(0, 255, (4, *model.input_shape[1:]))
    rows = randomisation_test(model, x, stages=cascade_stages(model), methods=SANITY_METHODS)
    assert {r["method"] for r in rows} == set(SANITY_METHODS) and len(rows) == 3 * len(cascade_stages(model))
    assert [r["blank_maps"] for r in rows] == [0.0] * len(rows)
    assert all(np.isfinite(r["spearman_per_image"]).all() for r in rows)
    for w, b in zip(model.get_weights(), before, strict=True):
        np.testing.assert_array_equal(w, b)


def test_randomising_every_layer_of_the_square_model_decorrelates_its_maps(blob_model):
    """Known answer: the trained model's Grad-CAM and saliency find the square; a model whose every
    layer is re-initialised knows no square, so its maps share little ranking with the trained ones."""
    model, x, boxes = blob_model
    idx = [b[0] for b in boxes[:8]]
    rows = randomisation_test(model, x[idx], layer="c2", stages=(3,), methods=SANITY_METHODS)
    found = {r["method"]: r for r in rows}
    assert found["gradcam"]["spearman"] < 0.5 and found["saliency"]["spearman"] < 0.5
    assert all(r["blank_maps"] == 0 for r in rows)
    columns = _randomisation_columns(model, x[idx], "covid", ("gradcam", "heatmap"))
    assert set(columns) == {f"{s}_{stage}_{m}" for s in ("spearman", "blank") for stage in ("top", "half", "all")
                            for m in ("gradcam", "heatmap")}
    assert columns["spearman_all_gradcam"] == pytest.approx(found["gradcam"]["spearman_per_image"])
    heats, grid = maps_and_grid(model, x[idx], "gradcam")  # what sanity() computes once and hands on
    assert grid == map_grid(model, x[idx], "gradcam")
    given = _randomisation_columns(model, x[idx], "covid", ("gradcam", "heatmap"), {"gradcam": heats})
    assert given["spearman_all_gradcam"] == pytest.approx(columns["spearman_all_gradcam"])


def test_the_random_deletion_order_takes_whole_cells_of_the_map():
    """Known answer: on a 4x4 image with a 2x2 map, each run of four pixels in the order is one cell."""
    order = _block_order((4, 4), (2, 2), np.random.default_rng(0))
    cells = (order // 4 // 2) * 2 + (order % 4) // 2
    assert sorted(order.tolist()) == list(range(16))
    assert all(len(set(cells[i:i + 4])) == 1 for i in range(0, 16, 4))
    assert len(set(cells[::4])) == 4
    pixels = _block_order((4, 4), None, np.random.default_rng(0))
    assert sorted(pixels.tolist()) == list(range(16))


def test_the_map_grid_is_the_resolution_a_method_works_at(small_model):
    model = small_model("mobilenet")
    x = np.random.default_rng(0).uniform(0, 255, (1, *model.input_shape[1:]))
    assert map_grid(model, x, "saliency") == model.input_shape[1:3]
    raw = gradcam.maps(model, x, None, 1)
    assert map_grid(model, x, "gradcam") == raw.shape[1:3] == map_grid(model, x, "heatmap")
    assert map_grid(model, x, "gradcam")[0] < model.input_shape[1]


def test_deletion_beats_random_on_a_trained_model(blob_model):
    model, x, boxes = blob_model
    i = boxes[0][0]
    heat = gradcam(model, x[i], layer="c2")[0]
    scores = deletion_insertion(model, x[i], heat)[0]
    assert scores["deletion_auc_map"] < scores["deletion_auc_random"]


def test_deleting_to_a_blur_also_beats_random_on_a_trained_model(blob_model):
    model, x, boxes = blob_model
    idx = [i for i, _, _ in boxes[:5]]
    heats = gradcam(model, x[idx], layer="c2")
    scores = deletion_insertion(model, x[idx], heats, fill="blur", steps=8, chunk=40)  # two images a predict
    assert sum(s["deletion_auc_map"] < s["deletion_auc_random"] for s in scores) >= 4
    together = deletion_insertion(model, x[idx], heats, fill="blur", steps=8)  # all five in one predict
    assert [pytest.approx(s, abs=1e-6) for s in together] == scores  # grouping into predicts changes nothing


def test_one_trace_serves_every_map_method_and_both_classes(small_model):
    """Tracing a deep model's backward pass costs seconds: the gallery's methods share one function."""
    model = small_model("mobilenet")
    x = np.random.default_rng(0).uniform(0, 255, (2, *model.input_shape[1:])).astype(np.float32)
    model.__dict__.pop("_covidlib_traced", None)  # the session's model may have been explained before
    for class_name in CLASS_KEYS:
        for method in ("cam", "gradcam", "gradcam++", "saliency"):
            assert explain(model, x, method, class_name=class_name).shape == (2, 32, 32)
    (fn,) = model._covidlib_traced.values()
    assert fn.experimental_get_tracing_count() == 1
    # ... and each class gets its own maps: the non-COVID score is minus the COVID logit
    covid, other = (_gradients(model, None, x, c)[1] for c in (1, 0))
    np.testing.assert_allclose(covid, -other, rtol=1e-5, atol=1e-6)
    # batches are padded to a power of two: three images (padded to four) get each image's own map
    three = np.random.default_rng(1).uniform(0, 255, (3, *model.input_shape[1:])).astype(np.float32)
    alone = np.concatenate([explain(model, three[i:i + 1], "gradcam") for i in range(3)])
    np.testing.assert_allclose(explain(model, three, "gradcam"), alone, atol=1e-5)


def test_fill_images_black_and_blur():
    img = np.zeros((32, 32, 1), np.float32)
    img[8:24, 8:24] = 200.0
    assert not fill_image(img, "black").any()
    blurred = fill_image(img, "blur")
    assert blurred.shape == img.shape and abs(blurred.mean() - img.mean()) < 1.0  # mass kept
    assert blurred[8, 8, 0] < 100 and blurred[6, 12, 0] > 10  # the square's sharp edge is gone
    with pytest.raises(CovidlibError, match="unknown fill 'noise'"):
        fill_image(img, "noise")


def test_target_layer_is_found_inside_a_nested_backbone(small_model):
    model = small_model("mobilenet")
    layer = find_target_layer(model)
    assert layer.startswith("backbone/")
    assert layer.split("/", 1)[1] == [ly for ly in model.get_layer("backbone").layers if _is_spatial(ly)][-1].name
    with pytest.raises(CovidlibError, match="unknown layer"):
        gradcam(model, np.zeros((1, 32, 32, 1)), layer="backbone/nope")


def test_cam_equals_gradcam_for_a_sigmoid_gap_dense_head():
    # With GAP + one sigmoid unit, d p / d A_k(i, j) = p (1 - p) w_k / (H W): Grad-CAM's channel
    # weights are the head's weights times a positive constant, so the normalised maps are CAM's.
    model = build_model("vgg16", input_size=128, loss="binary")
    images = np.random.default_rng(1).uniform(0, 255, (2, 128, 128, 1))
    last = find_target_layer(model)
    assert last == "backbone/block5_pool"
    np.testing.assert_allclose(cam(model, images), gradcam(model, images, layer=last), atol=1e-4)
    np.testing.assert_allclose(cam(model, images, class_name="non-covid"),
                               gradcam(model, images, layer=last, class_name="non-covid"), atol=1e-4)


@pytest.mark.parametrize("mode", ["scratch", "frozen"])
@pytest.mark.parametrize("loss", ["binary", "sparse"])
def test_cam_goes_through_the_whole_head_and_equals_gradcam(mode, loss):
    """A frozen head standardises the pooled features first: CAM must weight channel k by w_k / sigma_k."""
    import keras

    model = build_model("vgg16", input_size=192, loss=loss, mode=mode)
    rng = np.random.default_rng(2)
    if mode == "frozen":  # statistics as train() sets them, here far from the identity
        channels = model.get_layer("gap").output.shape[-1]
        feats = rng.normal(rng.uniform(-1, 1, channels), rng.uniform(0.2, 5, channels), (64, channels))
        model.get_layer("feature_norm").adapt(feats.astype("float32"))
    kernel = model.get_layer("head").kernel  # COVID's weights positive, so its maps cannot all be blank
    sign = np.array([-1.0, 1.0])[-kernel.shape[1]:]
    kernel.assign((np.abs(rng.normal(size=kernel.shape)) * sign).astype("float32"))
    images = rng.uniform(0, 255, (2, 192, 192, 1))
    last = find_target_layer(model)
    shares = []
    for cls in ("covid", "non-covid"):
        maps = cam(model, images, class_name=cls)
        shares.append((maps > 0.05).mean())
        # float32 throughout: agreement to 1e-3
        np.testing.assert_allclose(maps, gradcam(model, images, layer=last, class_name=cls), atol=1e-3)
    assert max(shares) > 0.1  # 6x6 maps with structure, not blank ones that agree trivially
    # the replayed forward pass is the model's own, before its sigmoid / softmax
    _, logits = _Forward(model, [last], logits=True)(images.astype("float32"))
    squash = keras.activations.sigmoid if loss == "binary" else keras.activations.softmax
    np.testing.assert_allclose(np.asarray(squash(logits)), np.asarray(model(images, training=False)), atol=1e-5)
    if mode == "frozen":  # the old CAM (the dense kernel alone, normalisation skipped) is measurably wrong
        (act,), _ = _Forward(model, ["backbone"])(images.astype("float32"))
        kernel = np.asarray(model.get_layer("head").kernel)[:, -1]
        old = _upsample(np.einsum("bhwc,c->bhw", np.asarray(act, np.float64), kernel), (192, 192))
        new = cam(model, images)
        assert new.max() == 1 and np.abs(old - new).max() > 0.03  # 20-50x the tolerance above


# The deep backbones take 15-40 s each to trace on 2 cores: the full run checks them, the fast lane the rest.
_DEEP = ("resnet101", "resnet152", "densenet201", "inceptionv3")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in _DEEP else n for n in ARCHITECTURES])
def test_every_method_runs_on_every_architecture(name, small_model):
    arch = ARCHITECTURES[name]
    size = max(arch.min_size, 32)
    model = small_model(name)
    img = np.random.default_rng(0).uniform(0, 255, (size, size, 1))
    for method in MAP_METHODS:
        if method == "cam" and arch.backbone is None:
            with pytest.raises(CovidlibError, match="CAM needs"):
                explain(model, img, method)
            continue
        for cls in ("covid", "non-covid"):
            maps = explain(model, img, method, class_name=cls)
            # normalised: peak exactly 1, or a blank (all-zero) map
            assert maps.shape == (1, size, size) and maps.min() >= 0 and maps.max() in (0.0, 1.0)
            if method == "saliency":  # an input gradient is never zero everywhere, even on a random model
                assert maps.max() == 1.0
    layers = feature_map_layers(model)
    acts = activations(model, img, layers[:3])
    assert list(acts) == layers[:3] and all(a.ndim == 3 for a in acts.values())
    rgb = overlay(img, heatmap(acts[layers[0]], (size, size)))
    assert rgb.shape == (size, size, 3) and rgb.dtype == np.uint8


def test_feature_grid_tiles_channels():
    maps = np.random.default_rng(0).random((5, 5, 9))
    grid = feature_grid(maps)
    assert grid.shape == (18, 18)


def _cam_cases():
    for name, arch in ARCHITECTURES.items():
        for mode in ("scratch", "frozen") if arch.backbone else ("scratch",):
            for loss in ("binary", "sparse"):
                yield pytest.param(name, mode, loss, id=f"{name}-{mode}-{loss}")


@pytest.mark.slow
@pytest.mark.parametrize("name, mode, loss", list(_cam_cases()))
def test_every_architecture_head_and_mode_replays_its_forward_and_cam_equals_gradcam(name, mode, loss):
    """The replayed forward pass equals model(x) before its sigmoid/softmax, and (with a pooling
    head) CAM equals Grad-CAM on the backbone's output, standardised frozen heads included."""
    import keras

    from covidlib.models.contract import backbone, feature_norm

    size = {"inceptionv3": 107, "alexnet": 67}.get(name, 64)  # backbone maps of at least 2x2
    model = build_model(name, input_size=size, loss=loss, mode=mode)
    rng = np.random.default_rng(3)
    if feature_norm(model) is not None:
        channels = backbone(model).output.shape[-1]
        feats = rng.normal(rng.uniform(-1, 1, channels), rng.uniform(0.2, 5, channels), (32, channels))
        feature_norm(model).adapt(feats.astype("float32"))
    images = rng.uniform(0, 255, (2, size, size, 1)).astype("float32")
    _, logits = _Forward(model, [], logits=True)(images)
    squash = keras.activations.sigmoid if loss == "binary" else keras.activations.softmax
    np.testing.assert_allclose(np.asarray(squash(logits)), np.asarray(model(images, training=False)), atol=1e-5)
    if backbone(model) is None:
        with pytest.raises(CovidlibError, match="CAM needs a global-average-pooling head"):
            cam(model, images)
        return
    for cls in ("covid", "non-covid"):
        np.testing.assert_allclose(cam(model, images, class_name=cls),
                                   gradcam(model, images, layer=backbone(model).name, class_name=cls), atol=1e-3)
