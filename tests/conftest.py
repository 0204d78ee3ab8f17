from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from covidlib.paths import SAMPLE_DATA


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Every test session gets its own cache, so no test can pass on a stale one."""
    os.environ["COVIDLIB_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The full dataset (COVIDLIB_DATA); tests that need it are skipped without it."""
    path = os.environ.get("COVIDLIB_DATA")
    if not path or not Path(path).is_dir() or Path(path).resolve() == SAMPLE_DATA.resolve():
        pytest.skip("COVIDLIB_DATA does not point at the full dataset")
    return Path(path)


@pytest.fixture(scope="session")
def sample_data() -> Path:
    return SAMPLE_DATA


def write_png(path: Path, size=(64, 48), mode="L", seed=0, value=None) -> Path:
    rng = np.random.default_rng(seed)
    w, h = size
    if mode == "L":
        arr = rng.integers(0, 256, (h, w), dtype=np.uint8) if value is None else np.full((h, w), value, np.uint8)
        im = Image.fromarray(arr, "L")
    elif mode in ("RGB", "RGBA"):
        arr = rng.integers(0, 256, (h, w, len(mode)), dtype=np.uint8)
        im = Image.fromarray(arr, mode)
    else:
        raise ValueError(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path


def write_array(path: Path, array: np.ndarray) -> Path:
    """A grey PNG with exactly these pixels (values clipped to 0..255)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(np.asarray(array), 0, 255).astype(np.uint8), "L").save(path)
    return path


def make_folder(root: Path, names=("COVID", "non-COVID"), n=4, size=(64, 48)) -> Path:
    for k, name in enumerate(names):
        for i in range(n):
            write_png(root / name / f"img{i}.png", size=size, seed=100 * k + i)
    return root


@pytest.fixture(scope="session")
def small_model():
    """Each architecture built once per test session at a small input size (weights none)."""
    from functools import cache

    from covidlib.models.architectures import ARCHITECTURES, build_model

    @cache
    def get(name: str, loss: str | None = None):
        arch = ARCHITECTURES[name]
        return build_model(name, input_size=max(arch.min_size, 32), loss=loss)

    return get


# Fixtures that run a whole smoke study (minutes on 2 cores): every test that uses one is slow, so
# `pytest -m "not slow"` stays the few-minute lane for everyday work; CI runs everything.
SLOW_FIXTURES = {"study"}


def pytest_collection_modifyitems(items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
