"""The classical lung mask on a phantom whose lungs are known, and the map share inside it."""

from __future__ import annotations

import numpy as np
import pytest

from covidlib.data.lungs import lung_mask, lung_share


def _phantom(size: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """A bright body on black, a table line, burnt-in text, and two dark lung ellipses inside."""
    yy, xx = np.mgrid[:size, :size]
    image = np.zeros((size, size), np.float32)
    body = ((xx - 100) / 80) ** 2 + ((yy - 95) / 60) ** 2 <= 1
    image[body] = 180
    lungs = np.zeros_like(body)
    for cx in (65, 135):
        lungs |= ((xx - cx) / 25) ** 2 + ((yy - 95) / 38) ** 2 <= 1
    image[lungs] = 40
    image[170:174, 10:190] = 220  # the table
    image[5:12, 5:40] = 255  # text in a corner
    rng = np.random.default_rng(0)
    return np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8), lungs


def test_the_mask_finds_the_phantom_s_lungs():
    image, lungs = _phantom()
    mask = lung_mask(image)
    iou = (mask & lungs).sum() / (mask | lungs).sum()
    assert iou > 0.85
    assert not mask[170:174].any() and not mask[5:12, 5:40].any()  # not the table, not the text


def test_share_of_a_map_inside_the_lungs():
    image, lungs = _phantom()
    mask = lung_mask(image)
    assert lung_share(lungs.astype(float), mask)["lung_share"] > 0.9  # a map on the lungs
    border = np.zeros(lungs.shape)
    border[:, :15] = 1  # a map on the image border
    assert lung_share(border, mask)["lung_share"] == 0.0
    uniform = lung_share(np.ones(lungs.shape), mask)
    assert uniform["lung_share"] == pytest.approx(uniform["lung_share_uniform"]) == pytest.approx(mask.mean())


@pytest.mark.real_data
def test_the_mask_lies_inside_the_body_on_real_slices(real_data):
    from PIL import Image

    for path in sorted((real_data / "COVID").glob("*.png"))[:10]:
        image = np.asarray(Image.open(path).convert("L"))
        share = lung_mask(image).mean()
        assert 0.05 < share < 0.6, (path.name, share)


def test_the_lung_views_black_out_exactly_the_mask_or_its_complement(tmp_path):
    from covidlib.data.images import read_image
    from covidlib.data.lungs import lung_view

    image, lungs = _phantom()
    mask = lung_mask(image)
    no_lungs, only = lung_view(image, "no_lungs"), lung_view(image, "lungs_only")
    assert (no_lungs[mask] == 0).all() and (no_lungs[~mask] == image[~mask]).all()
    assert (only[~mask] == 0).all() and (only[mask] == image[mask]).all()
    assert lung_view(image, "whole") is image
    assert (no_lungs[lungs] == 0).mean() > 0.8 and only[lungs].mean() > 20  # the phantom's lungs, as drawn
    from PIL import Image

    Image.fromarray(image).save(tmp_path / "slice.png")
    small = read_image(tmp_path / "slice.png", 50, lungs="no_lungs")[..., 0]
    # masked at full size, then resized: the left lung (centre 16, 24 at 50 px) black, the mediastinum not
    assert small[19:29, 13:19].mean() < 10 and small[19:29, 24:26].mean() > 100


def test_a_lung_view_outside_the_vocabulary_is_refused():
    from covidlib import CovidlibError
    from covidlib.data.lungs import lung_view

    with pytest.raises(CovidlibError, match="unknown lung view 'lungs'; valid: whole, no_lungs, lungs_only"):
        lung_view(_phantom()[0], "lungs")


def test_a_masked_view_is_cached_apart_and_whole_slices_keep_their_cache(sample_data):
    from covidlib.data.dataset import load_dataset
    from covidlib.data.images import decoded
    from covidlib.paths import cache_key

    ds = load_dataset(sample_data)
    whole, masked = decoded(ds, 32), decoded(ds, 32, lungs="no_lungs")
    assert whole.key == cache_key("decoded", 1, ds.manifest_hash, 32, 1, "stretch")  # as before the views existed
    assert masked.key != whole.key and whole.paths == masked.paths
    dark = np.asarray(masked.images, float).mean() < np.asarray(whole.images, float).mean()
    assert dark and (np.asarray(masked.images, int) <= np.asarray(whole.images, int) + 1).all()  # only blacked out


def test_the_lung_view_enters_a_runs_identity_only_when_it_masks():
    from covidlib.models.config import resolve
    from covidlib.models.runs import RunFolder

    whole = RunFolder.identity(resolve("basic_cnn", "smoke"), "s", "m")
    masked = RunFolder.identity(resolve("basic_cnn", "smoke", lungs="no_lungs"), "s", "m")
    assert "lungs" not in whole["settings"] and masked["settings"]["lungs"] == "no_lungs"
    assert whole["config_sha256"] != masked["config_sha256"]
