"""The case study end to end: notebooks under papermill, failure isolation, the book, a real browser."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from covidlib.study import run_study

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def study(tmp_path_factory, sample_data):
    """A smoke study of two architectures plus one made to fail (input too small for AlexNet)."""
    tmp = tmp_path_factory.mktemp("study")
    preset = tmp / "tiny.yaml"
    smoke = (ROOT / "covidlib" / "presets" / "smoke.yaml").read_text()
    preset.write_text(smoke.replace("alexnet: {input_size: 67}", "alexnet: {input_size: 20}"))
    cwd = os.getcwd()
    os.chdir(ROOT)  # the study finds notebooks/ and the book config from the repository root
    try:
        out = run_study(str(preset), archs=["basic_cnn", "alexnet", "mobilenet"], data=str(sample_data),
                        out=tmp / "study", book=True, cell_timeout=900)
    finally:
        os.chdir(cwd)
    return out


def test_every_notebook_executed_and_one_failure_is_isolated(study):
    status = json.loads((study / "status.json").read_text())
    for kind in ("random", "grouped"):
        assert status[f"basic_cnn-{kind}"]["status"] == "done"
        assert status[f"mobilenet-{kind}"]["status"] == "done"
        assert status[f"alexnet-{kind}"]["status"] == "failed"
        assert "too small" in status[f"alexnet-{kind}"]["error"]
    for name in ("dataset", "comparison", "validity", "explainability"):
        assert status[f"notebook:{name}"]["status"] == "done", status[f"notebook:{name}"]
        assert (study / "notebooks" / f"{name}.ipynb").exists()
    assert (study / "runs" / "basic_cnn-random" / "metrics.json").exists()
    assert not (study / "runs" / "alexnet-random" / "metrics.json").exists()


def test_rerun_skips_finished_runs(study, sample_data):
    before = (study / "runs" / "basic_cnn-random" / "metrics.json").stat().st_mtime_ns
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        run_study("smoke", archs=["basic_cnn"], data=str(sample_data), out=study, book=False, reports=False,
                  splits=["random"], cell_timeout=900)
    finally:
        os.chdir(cwd)
    assert (study / "runs" / "basic_cnn-random" / "metrics.json").stat().st_mtime_ns == before
    assert json.loads((study / "status.json").read_text())["basic_cnn-random"].get("skipped") is True


def test_book_built_with_numbers_glued_from_the_notebooks(study):
    index = ROOT / "_build" / "html" / "index.html"
    assert index.exists()
    results = (ROOT / "_build" / "html" / "book" / "results.html").read_text()
    assert "basic_cnn" in results or "mobilenet" in results  # the best model's name came from glue
    assert "cdn.jsdelivr.net/npm/requirejs" not in (ROOT / "_build" / "html" / "book" / "results" / "explainability.html").read_text()


def _dom(page: Path) -> str:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--virtual-time-budget=20000",
           f"--user-data-dir={page.parent / '.chromium'}", "--dump-dom", page.as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (.ci/run installs it)")
def test_pages_render_in_a_real_browser(study):
    html = ROOT / "_build" / "html" / "book" / "results"
    comparison = _dom(html / "comparison.html")
    assert 'class="main-svg"' in comparison, "no plotly figure drew on the comparison page"
    explain = _dom(html / "explainability.html")
    assert "lm-Widget" in explain and "widget-dropdown" in explain and "<select" in explain, \
        "the ipywidgets explorer did not render"
