from __future__ import annotations

import numpy as np
import pytest

from covidlib import CovidlibError
from covidlib.models.architectures import ARCHITECTURES, build_model
from covidlib.models.contract import Preprocess, covid_probability


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_every_factory_builds_and_gives_a_covid_probability(name, small_model):
    arch = ARCHITECTURES[name]
    size = max(arch.min_size, 32)
    model = small_model(name)
    x = np.random.default_rng(0).uniform(0, 255, (3, size, size, 1)).astype("float32")
    out = model.predict(x, verbose=0)
    assert out.shape == ((3, 1) if arch.loss == "binary" else (3, 2))
    p = covid_probability(out)
    assert p.shape == (3,) and np.all((p >= 0) & (p <= 1))
    if arch.backbone:
        assert model.get_layer("backbone") is not None and model.get_layer("gap") is not None


def test_loss_override_changes_the_head():
    assert build_model("mobilenet", input_size=32, loss="binary").output_shape == (None, 1)
    assert build_model("basic_cnn", loss="categorical").output_shape == (None, 2)


@pytest.mark.parametrize("mode", ["caffe", "tf", "torch"])
def test_preprocess_matches_keras_applications(mode):
    from keras.applications import imagenet_utils

    grey = np.random.default_rng(1).uniform(0, 255, (2, 8, 8, 1)).astype("float32")
    expected = imagenet_utils.preprocess_input(np.repeat(grey, 3, axis=-1).copy(), mode=mode)
    got = np.asarray(Preprocess(mode, 3)(grey))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


def test_covid_probability_reads_the_right_column():
    assert covid_probability(np.array([[0.2], [0.9]])).tolist() == [0.2, 0.9]
    assert covid_probability(np.array([[0.7, 0.3], [0.1, 0.9]])).tolist() == [0.3, 0.9]


def test_imagenet_offline_is_one_clean_message(monkeypatch, capsys, tmp_path):
    from keras.src.utils import file_utils

    def offline(*a, **k):
        raise Exception("URL fetch failure on https://storage.googleapis.com/...: None -- [Errno -3]")

    monkeypatch.setattr(file_utils, "get_file", offline)
    with pytest.raises(CovidlibError, match="cannot download ImageNet weights for vgg16.*--weights none"):
        build_model("vgg16", input_size=32, weights="imagenet")
    from covidlib.cli import main

    out = tmp_path / "run"
    assert main(["train", "--arch", "vgg16", "--weights", "imagenet", "--input-size", "32", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ImageNet" in err[0]
    assert not out.exists(), "a refused run left a folder behind"


@pytest.mark.parametrize(
    "kwargs, words",
    [({"name": "alexnet", "weights": "imagenet"}, "no ImageNet weights"),
     ({"name": "vgg16", "weights": "/no/such.h5", "input_size": 32}, "no such file"),
     ({"name": "inceptionv3", "input_size": 32}, "too small"),
     ({"name": "basic_cnn", "mode": "frozen"}, "no pretrained backbone"),
     ({"name": "lenet"}, "valid: basic_cnn, alexnet")],
)
def test_bad_model_options(kwargs, words):
    with pytest.raises(CovidlibError, match=words):
        build_model(**kwargs)
