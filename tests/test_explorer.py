"""The kernel-free map explorer: its data against the library's own maps, and the page clicked in Chromium."""

from __future__ import annotations

import base64
import json
import re

import cv2
import numpy as np
import pytest

from covidlib.explain import explorer as explorer_mod
from covidlib.explain.gallery import reference_paths
from covidlib.explain.maps import explain
from covidlib.models.config import resolve
from covidlib.models.contract import predict_covid
from covidlib.models.runs import RunFolder
from covidlib.models.train import train
from tests.browser import Explorer, chromium_page, exercise, screenshot_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory, sample_data):
    """A scratch model without pooling (no CAM) and a frozen random backbone with it, on one split."""
    root = tmp_path_factory.mktemp("explorer")
    return {arch: train(resolve(arch, "smoke", data=str(sample_data), seed=0, epochs=3, **extra), run_dir=root / arch)
            for arch, extra in (("basic_cnn", {}), ("mobilenet", {"mode": "frozen", "input_size": 32}))}


@pytest.fixture(scope="module")
def data(runs):
    return explorer_mod.explorer_data(runs)


def _decoded(uri: str) -> np.ndarray:
    raw = np.frombuffer(base64.b64decode(uri.split(",", 1)[1]), np.uint8)
    return cv2.imdecode(raw, cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255


def test_the_slices_are_the_splits_three_covid_then_three_non_covid(runs, data):
    first = runs["basic_cnn"]
    assert [s["path"] for s in data["slices"]] == reference_paths(first, 3, 1) + reference_paths(first, 3, 0)
    assert [s["label"] for s in data["slices"]] == ["COVID"] * 3 + ["non-COVID"] * 3


def test_each_model_offers_what_it_has_with_its_own_predictions(runs, data):
    by_key = {m["key"]: m for m in data["models"]}
    assert set(by_key["basic_cnn"]["maps"]) == {"gradcam", "gradcam++", "saliency"}  # no pooling: no CAM
    assert set(by_key["mobilenet"]["maps"]) == {"cam", "gradcam", "gradcam++", "saliency"}
    for key, run in runs.items():  # P(COVID) as the saved model predicts it for the slices it shows
        folder = RunFolder(run)
        images, _ = folder.slices([s["path"] for s in data["slices"]])
        expected = predict_covid(folder.load_model(), np.stack(images).astype(np.float32))
        np.testing.assert_allclose(by_key[key]["p_covid"], expected, atol=1e-3)
        assert 0 < len(by_key[key]["layers"]) <= 6


def test_a_shipped_map_is_the_librarys_map(runs, data):
    """Decoded from its JPEG, the shipped Grad-CAM equals explain()'s (JPEG and 112 px allow a little)."""
    folder = RunFolder(runs["mobilenet"])
    model, paths = folder.load_model(), [s["path"] for s in data["slices"]]
    images, _ = folder.slices(paths)
    maps = explain(model, np.stack(images).astype(np.float32), "gradcam", class_name="covid")
    shipped = next(m for m in data["models"] if m["key"] == "mobilenet")["maps"]["gradcam"]["covid"]
    compared = 0
    for uri, heat in zip(shipped, maps):
        if isinstance(uri, dict):  # said blank only when the map is flat
            assert np.ptp(heat) < 1 / 255 and uri == {"blank": "the same value everywhere"}
            continue
        got = cv2.resize(_decoded(uri), heat.shape[::-1], interpolation=cv2.INTER_LINEAR)
        assert np.abs(got - heat).mean() < 0.03
        compared += 1
    assert compared > 0


def test_a_blank_map_is_said_blank_with_its_reason_not_painted():
    assert explorer_mod._heat(np.full((8, 8), 0.7)) == {"blank": "the same value everywhere"}
    assert explorer_mod._heat(np.eye(8) * 1e-3) == {"blank": "the same value everywhere"}  # under one grey level
    assert explorer_mod._heat(np.where(np.eye(8) > 0, np.nan, 0.5)) == {"blank": "not finite: the computation failed"}
    assert explorer_mod._heat(np.eye(8)).startswith("data:image/jpeg;base64,")


def test_maps_are_kept_in_the_run_folder_and_reused(runs, data, monkeypatch):
    def refuse(self):
        raise AssertionError("the model was loaded again")

    monkeypatch.setattr(RunFolder, "load_model", refuse)
    assert explorer_mod.explorer_data(runs) == json.loads(json.dumps(data))


@pytest.mark.parametrize("name", ["</script><b>x", "<!--<script>", "__TITLE__ & __ID__"])
def test_the_page_carries_its_data_inline_and_no_file_name_can_break_it(data, name):
    page = explorer_mod.explorer_html({**data, "slices": [{**data["slices"][0], "name": name}, *data["slices"][1:]]})
    block = re.search(r'<script type="application/json" data-role="data">(.*?)</script>', page, re.S).group(1)
    assert "<" not in block and ">" not in block and "&" not in block  # no markup can start inside it
    assert json.loads(block)["slices"][0]["name"] == name  # and the name arrives unchanged
    assert page.count("</script>") == 2
    assert "http://" not in page and "https://" not in page  # nothing is fetched: it works offline


def test_every_control_changes_the_picture_in_chromium(data, tmp_path):
    page_file = tmp_path / "explorer.html"
    page_file.write_text(f"<!doctype html><meta charset=utf-8><body>{explorer_mod.explorer_html(data)}</body>")
    with chromium_page() as page:
        page.goto(page_file.as_uri())
        explorer = Explorer(page)
        assert explorer.options("method")[:1] == ["gradcam"]  # the Basic CNN first: no CAM offered
        exercise(explorer, screenshot_dir(tmp_path), "explorer-unit")
