"""The case study committed in book/results (`covidlib publish`): a clone builds it strictly, with no
warning, its numbers and its What ran box; and it embeds no image of the external test set, whose
licence allows evaluation only."""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "book" / "results"
published = pytest.mark.skipif(not (RESULTS / "what_ran.md").exists(), reason="no study published in book/results")
COPY = 16  # bits of 256: a slice and its resized copy in a page (most of the study's own are 0-6 apart)
EMBEDDED = re.compile(r"data:image/(?:png|jpeg);base64,([A-Za-z0-9+/=]+)")


def _embedded_images() -> list[np.ndarray]:
    """Every image a published notebook embeds (plots' PNGs and the galleries' tiles), grey."""
    images = []
    for notebook in sorted(RESULTS.glob("*.ipynb")):
        text = notebook.read_text().replace("\\\\u002f", "/").replace("\\u002f", "/")  # plotly escapes "/"
        for data in EMBEDDED.findall(text.replace("\\n", "")):
            img = cv2.imdecode(np.frombuffer(base64.b64decode(data), np.uint8), cv2.IMREAD_GRAYSCALE)
            if img is not None and min(img.shape) >= 32:
                images.append(img)
    return images


def _hashes(images: list[np.ndarray]) -> np.ndarray:
    import imagehash
    from PIL import Image

    from covidlib.data.hashes import HASH_BITS_SIDE, HASH_IMAGE

    bits = [imagehash.phash(Image.fromarray(cv2.resize(img, (HASH_IMAGE, HASH_IMAGE), interpolation=cv2.INTER_AREA)),
                            hash_size=HASH_BITS_SIDE).hash.ravel() for img in images]
    return np.packbits(np.stack(bits).astype(np.uint8), axis=1)


@published
def test_the_published_study_embeds_no_image_of_the_external_test_set():
    """Each embedded image is compared with every UCSD slice by perceptual hash; the same check finds
    the study's own slices among them, so it can fail."""
    from covidlib.data.dataset import load_dataset
    from covidlib.data.hashes import DEFAULT_THRESHOLD, nearest_distance, phashes

    ucsd, own = os.environ.get("COVIDLIB_UCSD"), os.environ.get("COVIDLIB_DATA")
    if not (ucsd and own):
        pytest.skip("needs COVIDLIB_UCSD (the external test set) and COVIDLIB_DATA (the study's dataset)")
    ours = _hashes(_embedded_images())
    assert len(ours) > 50
    to_own, to_ucsd = (nearest_distance(ours, phashes(load_dataset(folder))) for folder in (own, ucsd))
    assert (to_own <= COPY).sum() > 20  # the check finds the study's own slices among the pictures
    # a UCSD picture would be a copy of one, or nearer to one than to any slice of the study's dataset
    assert not ((to_ucsd <= COPY) | ((to_ucsd < to_own) & (to_ucsd <= DEFAULT_THRESHOLD))).any()


@published
@pytest.mark.slow
def test_the_published_study_builds_strictly_in_a_clone(tmp_path):
    from covidlib.study.publish import machine_paths

    clone = tmp_path / "clone"
    shutil.copytree(ROOT / "book", clone / "book")
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy(ROOT / name, clone / name)
    build = [str(Path(sys.executable).with_name("jupyter-book")), "build", str(clone), "-W", "-n", "--keep-going"]
    done = subprocess.run(build, capture_output=True, text=True)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert not machine_paths(RESULTS)
    html = clone / "_build" / "html" / "book"
    pages = sorted(html.rglob("*.html"))
    for page in pages:
        text = " ".join(re.sub(r"<script.*?</script>|<style.*?</style>|<[^>]+>", "", page.read_text(), flags=re.S).split())
        assert "What ran" in text, page.name
        for bad in ("object at 0x", "<IPython.", "Styler object", "|---|", "smoke build"):
            assert bad not in text, (page.name, bad)
    intro = " ".join(re.sub(r"<[^>]+>", "", (html / "intro.html").read_text()).split())
    assert "Preset cpu on sarscov2-ct (2481 images" in intro
    assert re.search(r"Like for like \(trained as the paper's row was, at its input size\), test accuracy in %: Basic "
                     r"CNN, ours \d+\.\d ± \d+\.\d, best \d+\.\d against the paper's 96\.57", intro)
    assert re.search(r"Over 5 folds of whole scans", intro) and "external test (746 images" in intro


@published
def test_the_published_explorer_carries_every_model_within_its_budget():
    """The kernel-free map explorer of the explainability chapter: all nine models, at most ~8 MB."""
    import json

    outputs = [o for cell in json.loads((RESULTS / "explainability.ipynb").read_text())["cells"]
               for o in cell.get("outputs", []) if "covidlib-explorer" in "".join(o.get("data", {}).get("text/html", ""))]
    assert len(outputs) == 1
    page = "".join(outputs[0]["data"]["text/html"])
    data = json.loads(re.search(r'<script type="application/json" data-role="data">(.*?)</script>', page, re.S)
                      .group(1).replace("<\\/", "</"))
    assert len(data["models"]) == 9 and len(data["slices"]) == 6
    assert len(page.encode()) <= 8e6, f"the explorer is {len(page.encode()) / 1e6:.1f} MB"
