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
