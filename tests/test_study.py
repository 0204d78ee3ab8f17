"""The case study end to end: notebooks under papermill, failure isolation, the book, a real browser."""

from __future__ import annotations

import ast
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from covidlib.evaluate import sentences as sentences_mod
from covidlib.evaluate.baselines import BASELINES
from covidlib.explain import gallery as gallery_mod
from covidlib.study import findings as findings_mod
from covidlib.study.runner import run_study

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def study(tmp_path_factory, sample_data):
    """A smoke study of two architectures plus one made to fail (input too small for AlexNet); the Basic
    CNN trains with augmentation, so the pages show what an augmented run prints."""
    tmp = tmp_path_factory.mktemp("study")
    preset = tmp / "tiny.yaml"
    smoke = (ROOT / "covidlib" / "presets" / "smoke.yaml").read_text()
    preset.write_text(smoke.replace("alexnet: {input_size: 67}", "alexnet: {input_size: 20}")  # made to fail
                      .replace("basic_cnn: {input_size: 32,", "basic_cnn: {input_size: 32, augment: true,"))  # as cpu's AlexNet
    cwd = os.getcwd()
    os.chdir(tmp)  # the study finds its notebooks and book sources wherever it is started
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            out = run_study(str(preset), archs=["basic_cnn", "alexnet", "mobilenet"], data=str(sample_data),
                            out=tmp / "study", book=True, cell_timeout=900)
    finally:
        os.chdir(cwd)
    (tmp / "progress.txt").write_text(log.getvalue())
    return out


def test_every_notebook_executed_and_one_failure_is_isolated(study):
    status = json.loads((study / "status.json").read_text())
    for kind in ("random", "scan"):
        assert status[f"basic_cnn-{kind}"]["status"] == "done"
        assert status[f"mobilenet-{kind}"]["status"] == "done"
        assert status[f"alexnet-{kind}"]["status"] == "failed"
        assert "too small" in status[f"alexnet-{kind}"]["error"]
    for name in ("dataset", "comparison", "validity", "explainability"):
        assert status[f"notebook:{name}"]["status"] == "done", status[f"notebook:{name}"]
        assert (study / "notebooks" / f"{name}.ipynb").exists()
    assert (study / "runs" / "basic_cnn-random" / "metrics.json").exists()
    record = json.loads((study / "runs" / "basic_cnn-scan" / "run.json").read_text())
    assert record["config"]["split_kind"] == "scan" == record["split"]["kind"]  # the split file decides
    assert not (study / "runs" / "alexnet-random" / "metrics.json").exists()
    progress = (study.parent / "progress.txt").read_text()
    assert "mobilenet-scan: training (mobilenet on the scan split, seed 42)" in progress  # which model runs
    assert re.search(r"\[\d+/12\] basic_cnn-random done in \d+ s", progress) and "min left" in progress  # and how long
    # is left (two notebooks at a time: which run finishes first varies)
    assert re.search(r"\[\d+/12\] alexnet-random FAILED", progress)  # 6 notebooks, 6 validity retrainings


def test_explainability_gallery_reuses_the_training_notebooks_maps(study, monkeypatch):
    """Every model on one split is explained on the same slices, and the maps are made once."""

    runs = {k: study / "runs" / f"{k}-random" for k in ("basic_cnn", "mobilenet")}
    paths = gallery_mod.reference_paths(runs["basic_cnn"])
    assert len(paths) == 3 and paths == gallery_mod.reference_paths(runs["mobilenet"])
    for run in runs.values():  # written by the training notebook
        assert len(list((run / "explain").glob("gallery-*.npz"))) == 1

    def no_new_maps(*a, **k):
        raise AssertionError("a gallery map was recomputed")

    monkeypatch.setattr(gallery_mod, "explain", no_new_maps)
    fig = gallery_mod.cam_gallery(runs["mobilenet"], paths)
    # one row per slice: the slice, then CAM, Grad-CAM, Grad-CAM++ and saliency overlays
    assert len(fig.data) == 3 * 5 and [a.text for a in fig.layout.annotations][1:5] == list(gallery_mod.GALLERY_METHODS)


def test_rerun_skips_finished_runs(study, sample_data):
    before = (study / "runs" / "basic_cnn-random" / "metrics.json").stat().st_mtime_ns
    cwd = os.getcwd()
    os.chdir(study.parent)
    try:
        run_study("smoke", archs=["basic_cnn"], data=str(sample_data), out=study, book=False, reports=False,
                  splits=["random"], cell_timeout=900)
    finally:
        os.chdir(cwd)
    assert (study / "runs" / "basic_cnn-random" / "metrics.json").stat().st_mtime_ns == before
    assert json.loads((study / "status.json").read_text())["basic_cnn-random"].get("skipped") is True


def _glued(notebook: Path) -> dict[str, str]:
    values = {}
    for cell in json.loads(notebook.read_text())["cells"]:
        for out in cell.get("outputs", []):
            name = out.get("metadata", {}).get("scrapbook", {}).get("name")
            if name:
                values[name] = out["data"]["application/papermill.record/text/plain"]
    return values


def _text(page: Path) -> str:
    import html
    import re

    body = re.sub(r"<script.*?</script>|<[^>]+>", "", page.read_text(), flags=re.S)
    return " ".join(html.unescape(body).split())


def test_book_built_with_numbers_glued_from_the_notebooks(study):
    index = study / "book" / "_build" / "html" / "index.html"
    assert index.exists()
    glued = _glued(study / "notebooks" / "comparison.ipynb")
    results = _text(study / "book" / "_build" / "html" / "book" / "results.html")
    best = glued["best_model"].strip("'")
    assert f"The best CNN on the random split was {best} with a test accuracy of " \
           f"{float(glued['best_accuracy']):.1f}%" in results
    for page in (study / "book" / "_build" / "html" / "book" / "intro.html",
                 study / "book" / "_build" / "html" / "book" / "results.html",
                 study / "book" / "_build" / "html" / "book" / "results" / "train_mobilenet-random.html"):
        text = _text(page)
        assert "What ran" in text and "A smoke build: these numbers mean nothing." in text, page.name
    assert "| mobilenet-scan | scratch | none | 32 px |" in (study / "book" / "book" / "results" / "what_ran.md").read_text()
    titles = {}
    for page in (study / "book" / "_build" / "html" / "book" / "results").glob("*.html"):
        titles[page.name] = re.search(r"<title>(.*?)</title>", page.read_text(), re.S).group(1)
    assert len(set(titles.values())) == len(titles), titles  # every page titled for what it shows
    assert titles["train_basic_cnn-scan.html"].startswith("Basic CNN, scan split")
    assert "cdn.jsdelivr.net/npm/requirejs" not in (study / "book" / "_build" / "html" / "book" / "results" / "explainability.html").read_text()


def _pages(study: Path) -> list[Path]:
    html = study / "book" / "_build" / "html"
    skip = ("genindex.html", "search.html")
    return sorted(p for p in html.rglob("*.html") if "_static" not in p.parts and p.name not in skip
                  and p.parent != html)  # html/index.html only redirects to the intro


def test_no_page_shows_machine_paths_log_lines_or_setup_code(study):
    import tempfile

    forbidden = [str(study), str(ROOT), str(Path.home()) + "/", tempfile.gettempdir() + "/",
                 "I0000", "E0000", "absl", "Traceback", "%pip", "[IPKernelApp]", "PosixPath", "RunConfig("]
    for page in _pages(study):
        text = page.read_text()
        visible = _text(page)
        found = [f for f in forbidden if f in visible or (f.startswith("/") and f in text)]
        assert not found, f"{page.relative_to(study)} shows {found}"


def test_every_page_has_a_unique_title_and_results_pages_say_what_ran(study):
    titles = {}
    for page in _pages(study):
        titles[page.name if page.parent.name != "results" else f"results/{page.name}"] = \
            re.search(r"<title>(.*?)</title>", page.read_text(), re.S).group(1)
        if "book" in page.parts and page.name != "index.html":
            assert "What ran" in _text(page), page.name
    assert len(set(titles.values())) == len(titles), titles


def test_plotly_js_is_loaded_once_for_the_whole_book(study):
    html = study / "book" / "_build" / "html"
    assert (html / "_static" / "plotly.min.js").stat().st_size > 1_000_000
    for page in _pages(study):
        text = page.read_text()
        assert "plotly.js v" not in text, f"{page.name} inlines plotly.js"  # the library's banner comment
        assert "plotly.min.js" in text, page.name


def test_table1_sets_the_five_metrics_beside_the_paper(study):
    text = _text(study / "book" / "_build" / "html" / "book" / "results.html")
    for metric in ("ACC", "PRE", "REC", "F1", "AUC"):
        assert metric in text
    assert "96.57" in text and "Mean of" not in text  # the paper's Basic CNN; no mean over unlike rows
    assert "Like the paper's row? " in text and "no: no ImageNet weights" in text  # MobileNet from scratch
    assert re.search(r"Like for like \(trained as the paper's row was, at its input size\), test accuracy in %: Basic "
                     r"CNN, ours \d+\.\d \(\d+\.\d-\d+\.\d\) against the paper's 96\.57", text), text
    assert re.search(r"\d+\.\d \(\d+\.\d-\d+\.\d\)", text), "no 'value (low-high)' cell"


def _glue_references(chapter: Path) -> list[tuple[str, str, str]]:
    return re.findall(r"\{glue:text\}`results/(\w+)\.ipynb::(\w+):([^`]*)`", chapter.read_text())


def test_every_glued_value_appears_on_its_page(study):
    html = study / "book" / "_build" / "html" / "book"
    checked = 0
    for chapter in sorted((ROOT / "book").glob("*.md")):
        text = _text(html / f"{chapter.stem}.html")
        for notebook, key, fmt in _glue_references(chapter):
            raw = _glued(study / "notebooks" / f"{notebook}.ipynb")[key]
            value = ast.literal_eval(raw) if fmt == "s" else format(float(raw) if "f" in fmt else int(raw), fmt)
            assert value in text, f"{chapter.name}: {notebook}::{key} = {value!r} not on the page"
            checked += 1
    assert checked >= 30


SCREENSHOTS = ("book/intro.html", "book/results/comparison.html", "book/results/train_mobilenet-random.html",
               "book/results/validity.html")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (.ci/run installs it)")
def test_screenshots_of_four_pages_for_a_person_to_look_at(study):
    """Saved under the build folder (or $COVIDLIB_SCREENSHOTS, which .ci/run sets) and checked not blank."""
    import numpy as np
    from PIL import Image

    html = study / "book" / "_build" / "html"
    out = Path(os.environ.get("COVIDLIB_SCREENSHOTS", html.parent / "screenshots"))
    out.mkdir(parents=True, exist_ok=True)
    for name in SCREENSHOTS:
        png = out / (name.replace("/", "_").removesuffix(".html") + ".png")
        subprocess.run([*_chromium(html), "--window-size=1280,2400", f"--screenshot={png}", (html / name).as_uri()],
                       capture_output=True, timeout=120)
        pixels = np.asarray(Image.open(png).convert("RGB"))
        assert pixels.shape[:2] == (2400, 1280) and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50, png
    for name in SCREENSHOTS[1:]:
        assert 'class="main-svg"' in _dom(html / name), f"no plotly figure drew on {name}"


def _chromium(html: Path) -> list[str]:
    return [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
            "--virtual-time-budget=20000", f"--user-data-dir={html / '.chromium'}"]


def _dom(page: Path) -> str:
    cmd = [*_chromium(page.parent), "--dump-dom", page.as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (.ci/run installs it)")
def test_pages_render_in_a_real_browser(study):
    html = study / "book" / "_build" / "html" / "book" / "results"
    comparison = _dom(html / "comparison.html")
    assert 'class="main-svg"' in comparison, "no plotly figure drew on the comparison page"
    explain = _dom(html / "explainability.html")
    assert "covidlib-explorer" in explain and not re.search(r'class="[^"]*widget-dropdown', explain), \
        "the book shows the kernel-free explorer, not a widget that cannot change without a kernel"


def test_the_books_map_explorer_works_without_a_kernel_in_light_and_dark(study):
    """Every control of the built book's explorer changes its picture; its controls follow the theme."""
    from tests.browser import Explorer, chromium_page, exercise, screenshot_dir

    page_file = study / "book" / "_build" / "html" / "book" / "results" / "explainability.html"
    shots = screenshot_dir(study / "book" / "_build" / "screenshots")
    brightness, contrast = {}, {}
    with chromium_page() as page:
        for theme in ("light", "dark"):  # pydata-sphinx-theme keeps the reader's choice in localStorage
            page.goto(page_file.as_uri())
            page.evaluate(f"localStorage.setItem('mode', '{theme}'); localStorage.setItem('theme', '{theme}')")
            page.reload()
            explorer = Explorer(page)
            explorer.root.scroll_into_view_if_needed()
            assert page.evaluate("document.documentElement.dataset.theme") == theme
            brightness[theme] = explorer.root.evaluate(
                "el => getComputedStyle(el).backgroundColor.match(/\\d+/g).slice(0, 3).reduce((a, b) => a + Number(b), 0) / 765")
            contrast[theme] = explorer.contrast()
            if theme == "light":
                exercise(explorer, shots, "book-explorer")
            else:
                explorer.shoot(shots / "book-explorer-dark.png")
            assert not explorer.errors(), explorer.errors()
    assert brightness["dark"] < 0.5 < brightness["light"], brightness  # its own background follows the theme
    assert min(contrast.values()) > 0.4, contrast  # and its controls stay readable on it


def test_a_rebuild_shows_the_new_study_numbers_in_unchanged_chapters(study, tmp_path):
    """A rerun study must not leave the previous run's numbers in the prose (Sphinx caches pages)."""
    from covidlib.study.book import build_book

    copy = tmp_path / "study"
    shutil.copytree(study / "notebooks", copy / "notebooks")
    shutil.copytree(study / "book", copy / "book")  # with its _build: Sphinx's cache of the first build
    path = copy / "notebooks" / "comparison.ipynb"
    nb = json.loads(path.read_text())
    for cell in nb["cells"]:
        for out in cell.get("outputs", []):
            if out.get("metadata", {}).get("scrapbook", {}).get("name") == "best_accuracy":
                out["data"]["application/papermill.record/text/plain"] = "12.345"
    path.write_text(json.dumps(nb))
    build_book(copy)
    assert "with a test accuracy of 12.3%" in _text(copy / "book" / "_build" / "html" / "book" / "results.html")


def test_study_command_exits_1_and_names_what_failed(study, monkeypatch, capsys):
    """The fixture's study had AlexNet fail on both splits; the command must not report success."""
    from covidlib.cli import main

    monkeypatch.setattr("covidlib.study.runner.run_study", lambda *a, **k: study)
    assert main(["study", "--preset", "smoke", "--out", str(study)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "alexnet-random" in err[0] and "alexnet-scan" in err[0] and "basic_cnn" not in err[0]


def _outputs(nb: dict) -> str:
    return "\n".join("".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/plain", ""))
                     + "".join(o.get("data", {}).get("text/html", ""))
                     for cell in nb["cells"] for o in cell.get("outputs", []))


def test_each_notebook_runs_from_notebooks_in_a_clone_with_its_defaults(study, tmp_path, monkeypatch, sample_data):
    """JupyterLab in a clone: the kernel starts in notebooks/, the study lies in studies/ beside it."""
    import papermill as pm

    clone = tmp_path / "clone"
    shutil.copytree(ROOT / "notebooks", clone / "notebooks")
    (clone / "studies").mkdir()
    (clone / "studies" / "smoke").symlink_to(study)
    monkeypatch.delenv("COVIDLIB_STUDY", raising=False)
    monkeypatch.delenv("COVIDLIB_BOOK", raising=False)
    monkeypatch.setenv("COVIDLIB_DATA", str(sample_data))  # the default a clone without the full data has
    texts = {}
    for name in ("dataset", "train", "comparison", "validity", "explainability"):
        path = clone / "notebooks" / f"{name}.ipynb"
        pm.execute_notebook(str(path), str(path), kernel_name="python3", cwd=str(clone / "notebooks"),
                            progress_bar=False, execution_timeout=900)  # saved in place, as JupyterLab does
        texts[name] = _outputs(json.loads(path.read_text()))
    for name in ("comparison", "validity", "explainability"):
        assert f"showing the study in {study.resolve()}" in texts[name]
    renderer = re.compile(r"plotly_renderer</td>\s*<td[^>]*>([^<]+)</td>")
    assert renderer.search(texts["train"]).group(1) == "plotly_mimetype"  # plotly's choice for a Jupyter kernel
    assert (clone / "notebooks" / "runs").is_dir()  # the training notebook's own run, beside it
    book_run = _outputs(json.loads((study / "notebooks" / "train_basic_cnn-random.ipynb").read_text()))
    assert renderer.search(book_run).group(1) == "plotly_mimetype+covidlib_book"  # the study renders for the book


def test_a_study_folder_made_from_other_data_or_seed_is_not_silently_reused(tmp_path, sample_data):
    from covidlib import CovidlibError
    from covidlib.data.dataset import load_dataset
    from covidlib.study.folder import StudyFolder
    from covidlib.study.runner import prepare_splits

    dataset, study = load_dataset(sample_data), StudyFolder(tmp_path)
    made = prepare_splits(study, dataset, ["random"], seed=1)
    first = Path(made["random", None]).read_bytes()
    assert prepare_splits(study, dataset, ["random"], seed=1) == made  # same data and seed: kept
    with pytest.raises(CovidlibError, match="was made from other data or with another seed .* pass --force"):
        prepare_splits(study, dataset, ["random"], seed=2)
    prepare_splits(study, dataset, ["random"], seed=2, force=True)
    assert json.loads((tmp_path / "split-random.json").read_text())["seed"] == 2
    assert Path(made["random", None]).read_bytes() != first


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["random", "scan"])
def test_a_study_of_one_split_and_one_model_builds_its_whole_book(tmp_path, sample_data, kind):
    """Any subset a user may ask for builds a complete book whose pages say what is absent."""
    out = run_study("smoke", archs=["basic_cnn"], data=str(sample_data), out=tmp_path / "study", splits=[kind],
                    book=True, cell_timeout=900)
    assert json.loads((out / "status.json").read_text())["notebook:validity"]["status"] == "done"
    validity = _text(out / "book" / "_build" / "html" / "book" / "validity.html")
    other = "scan" if kind == "random" else "random"
    assert f"This study has only the {kind} split, so the drop from the random to the scan split was not measured" \
        in validity
    results = _text(out / "book" / "_build" / "html" / "book" / "results.html")
    assert f"The best CNN on the {kind} split was Basic CNN" in results and f"on the {other} split" not in results


def test_the_validity_sentence_keeps_cnns_and_baselines_apart():
    import pandas as pd


    leak = pd.DataFrame({"kind": ["cnn", "cnn", "baseline"], "random_accuracy": [0.9, 0.8, 0.96],
                         "scan_accuracy": [0.9, 0.7, 0.92]}, index=["a", "b", "nearest_neighbour"])
    leak["accuracy_drop"] = leak["random_accuracy"] - leak["scan_accuracy"]
    assert sentences_mod.drop_sentence(leak) == (
        "Test accuracy on the random split minus test accuracy on the scan split was from +0.0 (a) to +10.0 points (b) "
        "across the 2 CNNs and +4.0 points for the shortcut baseline (1-NN on 32x32 pixels) (positive: the random "
        "split flatters; each model's drop, with both intervals, is in the table).")
    assert "+4.0" not in sentences_mod.drop_sentence(leak, "cnn")  # no mean over the CNNs either: the range
    assert "from +0.0 (a) to +10.0 points (b) across the 2 CNNs" in sentences_mod.drop_sentence(leak, "cnn")
    assert "+4.0 points for the shortcut baseline" in sentences_mod.drop_sentence(leak, "baseline")
    assert sentences_mod.drop_sentence(leak.iloc[:2], "baseline") == "No shortcut baselines ran on both splits."


def _ucsd_like(study: Path, root: Path, jpeg: int = 0) -> Path:
    """The study's random-split test slices laid out like UCSD's folders, re-encoded as RGB PNG
    (pixels unchanged), plus ``jpeg`` JPEG copies; not byte-identical to the training data."""
    import pandas as pd
    from PIL import Image

    data = Path(json.loads((study / "runs" / "basic_cnn-random" / "run.json").read_text())["data"]["root"])
    test = pd.read_csv(study / "runs" / "basic_cnn-random" / "predictions.csv").query("split == 'test'")
    for i, (path, y) in enumerate(zip(test["path"], test["y"])):
        folder = root / ("CT_COVID" if y == 1 else "CT_NonCOVID")
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.open(data / path).convert("RGB")
        image.save(folder / f"{Path(path).stem}.png")
        if i < jpeg:
            image.save(folder / f"{Path(path).stem}-copy.jpg", quality=90)
    return root


def test_external_evaluation_of_every_model_and_baseline_is_known_on_re_encoded_test_slices(study, tmp_path):
    """Known answer: the same pixels in another folder and format give the internal test accuracy."""

    external = _ucsd_like(study, tmp_path / "ucsd")
    n = len(list(external.rglob("*.png")))
    table = findings_mod.external_table(study, external, "random", n_resamples=200)
    assert set(table.index) == {"basic_cnn", "mobilenet", *BASELINES}
    assert n >= 10 and (table["n"] == n).all()
    for m in ("accuracy", "recall", "specificity", "auc"):
        assert (table[f"external_{m}"] == table[f"internal_{m}"]).all(), m
    sentence = sentences_mod.external_sentence(table, external)
    assert sentence.startswith(f"On the external test ({n} images from ucsd), the 2 CNNs lost 0.0 accuracy points")
    mixed = _ucsd_like(study, tmp_path / "ucsd-jpeg", jpeg=6)  # JPEG and RGB PNG, as UCSD publishes them
    assert (findings_mod.external_table(study, mixed, "random", n_resamples=200)["n"] == n + 6).all()


@pytest.mark.slow
def test_a_study_with_seeds_aggregates_them_in_table1_only(tmp_path, sample_data):
    out = run_study("smoke", archs=["basic_cnn"], data=str(sample_data), out=tmp_path / "study", splits=["random"],
                    seeds=2, cell_timeout=900)
    assert {p.name for p in (out / "runs").iterdir() if p.is_dir()} == {"basic_cnn-random", "basic_cnn-random-seed43"}
    seeds = [json.loads((out / "runs" / r / "run.json").read_text())["config"]["seed"]
             for r in ("basic_cnn-random", "basic_cnn-random-seed43")]
    assert seeds == [42, 43]
    main_split, seed_split = (pd.read_csv(out / f"split-{name}.csv") for name in ("random", "random-seed43"))
    assert main_split.query("split == 'test'").equals(seed_split.query("split == 'test'"))  # one test set
    assert set(main_split.query("split == 'val'").path) != set(seed_split.query("split == 'val'").path)
    used = pd.read_csv(out / "runs" / "basic_cnn-random-seed43" / "split.csv")  # the smoke subset of it
    assert set(used.query("split == 'val'").path) <= set(seed_split.query("split == 'val'").path)
    html = out / "book" / "_build" / "html" / "book"
    results = _text(html / "results.html")
    assert re.search(r"Basic CNN scratch, none, 32 px yes 2 96\.57 \d+\.\d ± \d+\.\d, best \d+\.\d", results), results
    extra_seed_page = (html / "results" / "train_basic_cnn-random-seed43.html").read_text()
    assert "Basic CNN, random split, seed 43" in extra_seed_page
    main_page = (html / "results" / "train_basic_cnn-random.html").read_text()
    assert '"text":"gradcam++"' in main_page and '"text":"gradcam++"' not in extra_seed_page  # no maps twice
    assert "drawn on its main seed" in extra_seed_page
    assert not list((out / "runs" / "basic_cnn-random-seed43" / "explain").glob("gallery-*"))
    assert list((out / "runs" / "basic_cnn-random" / "explain").glob("gallery-*"))
    comparison = _glued(out / "notebooks" / "comparison.ipynb")
    assert comparison["models_text"] == "'one model'"  # figures and pairwise tests: one run per model


@pytest.mark.parametrize("study_text, words", [
    ("study: {seeds: 0}", "study seeds must be a whole number >= 1, got 0"),
    ("study: {jobs: two}", "study jobs must be a whole number >= 1, got 'two'"),
    ("study: {workers: 2}", "'study' must map seeds, jobs, scan_folds, sanity_slices to whole numbers"),
    ("study: {sanity_slices: 0}", "study sanity_slices must be a whole number >= 1, got 0"),
    ("study: {scan_folds: 1}", "study scan_folds must be 0 or a whole number from 2 to 20, got 1"),
    ("study: {scan_folds: 21}", "study scan_folds must be 0 or a whole number from 2 to 20, got 21"),
])
def test_a_preset_with_bad_study_settings_is_one_line(tmp_path, sample_data, capsys, study_text, words):
    from covidlib.cli import main

    preset = tmp_path / "mine.yaml"
    preset.write_text(f"{study_text}\narchs:\n  basic_cnn: {{input_size: 32}}\n")
    code = main(["study", "--preset", str(preset), "--data", str(sample_data), "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and words in err[0], err
    assert not (tmp_path / "s").exists()


def test_the_presets_study_settings():
    from covidlib.models.config import Preset

    assert Preset.load("cpu").study == {"seeds": 3, "jobs": 2, "scan_folds": 5, "sanity_slices": 10}
    assert Preset.load("smoke").study == {"seeds": 1, "jobs": 2, "scan_folds": 2, "sanity_slices": 20}
    assert Preset.load("paper").study == {"seeds": 1, "jobs": 1, "scan_folds": 5, "sanity_slices": 20}


def test_the_sweep_trains_the_basic_cnn_on_every_level_with_the_studys_settings(study, sample_data):
    from covidlib.data.dataset import load_dataset
    from covidlib.evaluate.sweep import cnn_on_levels, coarseness_sweep, sweep_splits

    dataset = load_dataset(sample_data)
    levels = sweep_splits(dataset, levels=(None, 20))
    preds = cnn_on_levels(study / "runs" / "basic_cnn-scan", levels, study / "sweep")
    assert set(preds) == set(levels)
    for groups, split in levels.items():
        run = study / "sweep" / "runs" / f"basic_cnn-{groups}-groups"
        used = pd.read_csv(run / "split.csv")
        assert set(preds[groups]["path"]) == set(used.query("split == 'test'").path) <= set(split.paths("test"))
        settings = json.loads((run / "run.json").read_text())["config"]
        template = json.loads((study / "runs" / "basic_cnn-scan" / "run.json").read_text())["config"]
        drop = ("split", "split_kind")  # the split file decides the kind
        assert {k: v for k, v in settings.items() if k not in drop} == {k: v for k, v in template.items() if k not in drop}
    first = {g: (study / "sweep" / "runs" / f"basic_cnn-{g}-groups" / "model.keras").stat().st_mtime for g in levels}
    cnn_on_levels(study / "runs" / "basic_cnn-scan", levels, study / "sweep")  # finished runs are reused, not retrained
    assert first == {g: (study / "sweep" / "runs" / f"basic_cnn-{g}-groups" / "model.keras").stat().st_mtime
                     for g in levels}
    sweep = coarseness_sweep(dataset, splits=levels, cnn=preds, n_resamples=100)
    assert set(sweep.query("model == 'basic_cnn'")["groups"]) == set(levels)


def test_sweep_cnn_reaches_the_validity_notebook_only(study, sample_data, monkeypatch):
    """``covidlib study --sweep-cnn``: the one parameter flows from the study to the validity notebook."""
    executed = {}
    monkeypatch.setattr("covidlib.study.notebooks.run_notebook", lambda notebook, out, params, cwd, timeout: executed.update({notebook.stem: params}))
    run_study("smoke", archs=["basic_cnn"], data=str(sample_data), out=study, book=False, splits=["random"],
              sweep_cnn=True)
    assert executed["validity"]["sweep_cnn"] is True
    assert all("sweep_cnn" not in params for name, params in executed.items() if name != "validity")


def test_the_validity_notebooks_scan_cross_validation_tested_every_slice_once_on_whole_scans(study):
    from covidlib.evaluate.folds import fold_run_name

    cv = study / "scan-cv"
    folds = [pd.read_csv(cv / f"split-scan-fold{i}-of-2.csv") for i in (1, 2)]
    tested = pd.concat([f.loc[f["split"] == "test", "path"] for f in folds])
    assert tested.is_unique and set(tested) == set(folds[0]["path"])  # every slice tested exactly once
    for fold in folds:
        test_scans = set(fold.loc[fold["split"] == "test", "group"])
        assert not test_scans & set(fold.loc[fold["split"] != "test", "group"])  # no scan on both sides
    template = json.loads((study / "runs" / "basic_cnn-scan" / "run.json").read_text())["config"]
    for i in range(2):
        run = cv / "runs" / fold_run_name("basic_cnn", i, 2)
        settings = json.loads((run / "run.json").read_text())["config"]
        assert {k: v for k, v in settings.items() if k not in ("split", "out")} == \
            {k: v for k, v in template.items() if k not in ("split", "out")}
        used = pd.read_csv(run / "split.csv")
        tested = set(used.loc[used["split"] == "test", "path"])  # the smoke preset's subsample of the fold's
        assert tested and tested <= set(folds[i].loc[folds[i]["split"] == "test", "path"])
    glued = _glued(study / "notebooks" / "validity.ipynb")
    assert glued["fold_sentence"].startswith("'Over 2 folds of whole scans") and "Basic CNN" in glued["fold_sentence"]


def test_the_lung_masked_runs_kept_their_templates_settings_and_split(study):
    from covidlib.evaluate.masking import MASKED_VIEWS, masked_run_dir

    for kind in ("random", "scan"):
        template = study / "runs" / f"basic_cnn-{kind}"
        expected = json.loads((template / "run.json").read_text())["config"]
        for view in MASKED_VIEWS:
            run = masked_run_dir(study / "lung-masked", "basic_cnn", kind, view)
            settings = json.loads((run / "run.json").read_text())["config"]
            assert settings["lungs"] == view
            assert {k: v for k, v in settings.items() if k not in ("split", "lungs", "out")} == \
                {k: v for k, v in expected.items() if k not in ("split", "lungs", "out")}
            assert (run / "split.csv").read_bytes() == (template / "split.csv").read_bytes()
    masked = _glued(study / "notebooks" / "validity.ipynb")["masked_sentence"]
    assert re.fullmatch(r"'Test accuracy \(95% CI\) on the random and the scan splits, in that order: the Basic CNN "
                        r"reached .* on whole slices, .* with the lung fields blacked out and .* with only the lungs left;"
                        r" with the lungs blacked out the best shortcut baseline reached .*\. Chance is about 50%\.'", masked), masked


def test_no_page_of_the_book_shows_an_object_repr_or_raw_markdown(study):
    """A glued object the book cannot render shows as its repr; a Markdown table pasted as text shows
    its pipes. Neither may reach a reader (the model card once showed '<IPython.core.display.Markdown
    object>')."""
    pages = sorted((study / "book" / "_build" / "html").rglob("*.html"))
    assert len(pages) > 10
    for page in pages:
        text = _text(page)
        for bad in ("object at 0x", "<IPython.", "<pandas.", "Styler object", "|---|"):
            assert bad not in text, (page.name, bad)
    mobilenet = _text(study / "book" / "_build" / "html" / "book" / "results" / "train_mobilenet-random.html")
    assert 'arch = "basic_cnn"' not in mobilenet and "mobilenet" in mobilenet  # the run's settings, not the defaults
    card = _text(study / "book" / "_build" / "html" / "book" / "model_card.html")
    assert "Model card: " in card and "CLAIM 2024 checklist" in card and "External testing" in card


def test_the_validity_notebooks_retrainings_ran_in_the_pool_and_the_notebook_reused_them(study):
    """The scan folds and the lung-masked views train beside the training notebooks (two at a time),
    not one after another inside the validity notebook, which then only reads them."""
    status = json.loads((study / "status.json").read_text())
    retrained = {k for k in status if k.startswith(("scan-cv:", "lung-masked:"))}
    assert retrained == {"scan-cv:basic_cnn-scan-fold1-of-2", "scan-cv:basic_cnn-scan-fold2-of-2",
                         *(f"lung-masked:basic_cnn-{kind}-{view}" for kind in ("random", "scan")
                           for view in ("no_lungs", "lungs_only"))}
    assert all(status[k]["status"] == "done" for k in retrained), status
    reports_began = (study / "notebooks" / "dataset.ipynb").stat().st_mtime  # the first report notebook
    for key in retrained:
        folder, name = key.split(":")
        assert (study / folder / "runs" / name / "model.keras").stat().st_mtime < reports_began, key
    assert status["notebook:validity"]["status"] == "done"


def test_the_hardest_slices_stand_between_their_scan_neighbours(study):
    from covidlib.evaluate.stats import test_predictions

    preds = [test_predictions(study / "runs" / f"{arch}-random") for arch in ("basic_cnn", "mobilenet")]
    both_wrong = sum(((p["p_covid"] >= 0.5).astype(int) != p["y"]).to_numpy() for p in preds) == 2
    fig = findings_mod.hardest_slices(study, "random", n=3)
    if not both_wrong.any():  # "most" of two models is both
        assert fig is None
        return
    titles = [a.text for a in fig.layout.annotations]
    shown = min(3, int(both_wrong.sum()))
    assert len(titles) == 3 * shown == len(fig.data)  # each slice with the slice before and after it
    for before, slice_, after in zip(titles[::3], titles[1::3], titles[2::3]):
        assert re.fullmatch(r"\S+ \(\d+\)\.png: 2 of 2 wrong", slice_), slice_
        assert before.startswith("before: ") and after.startswith("after: ")
        assert re.search(r"\((train|val|test|not in this run|no such file)\)$", before), before


def test_publish_compacts_the_study_and_a_checkout_builds_it_strictly(study, tmp_path):
    """`covidlib publish` then `jupyter-book build .` in a clone: the real book with no warning, no
    machine path, no plotly JSON twin, images as PNG; and without a published study, one line."""
    from covidlib.cli import main
    from covidlib.study.publish import PLOTLY_MIME, machine_paths

    checkout = tmp_path / "clone"
    shutil.copytree(ROOT / "book", checkout / "book", ignore=shutil.ignore_patterns("results"))
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy(ROOT / name, checkout / name)
    build = [str(Path(os.sys.executable).with_name("jupyter-book")), "build", str(checkout), "-W", "-n", "--keep-going"]
    empty = subprocess.run(build, capture_output=True, text=True)
    assert empty.returncode != 0 and "no published study in book/results: run `covidlib study" in empty.stdout + empty.stderr
    assert main(["publish", str(study), "--into", str(checkout / "book" / "results")]) == 0
    dest = checkout / "book" / "results"
    assert sorted(p.name for p in dest.glob("*.ipynb")) == [
        "comparison.ipynb", "dataset.ipynb", "explainability.ipynb", "train_basic_cnn-random.ipynb",
        "train_basic_cnn-scan.ipynb", "train_mobilenet-random.ipynb", "train_mobilenet-scan.ipynb", "validity.ipynb"]
    assert not machine_paths(dest), machine_paths(dest)[:3]
    text = "".join(p.read_text() for p in dest.glob("*.ipynb"))
    assert PLOTLY_MIME not in text and "png;base64," in text  # image traces as PNG (tests/test_publish.py)
    assert sum(p.stat().st_size for p in dest.iterdir()) < 25 * 2**20
    assert "CC BY-NC-SA 4.0" in (dest / "LICENSE.md").read_text()
    built = subprocess.run(build, capture_output=True, text=True)
    assert built.returncode == 0, (built.stdout + built.stderr)[-3000:]
    html = checkout / "_build" / "html" / "book"
    intro = _text(html / "intro.html")
    assert "What ran" in intro and "A smoke build: these numbers mean nothing." in intro
    assert re.search(r"The best CNN on the random split was Basic CNN|The best CNN on the random split was MobileNet", intro)
    assert "What ran" in _text(html / "validity.html") and "Over 2 folds of whole scans" in _text(html / "validity.html")


def test_jupyterlab_runs_the_notebooks_in_chromium_and_its_explorers_answer(study, tmp_path):
    """JupyterLab from this checkout (the [lab] extra, ipywidgets 8) on a free port with a token: Chromium
    opens train.ipynb and explainability.ipynb, runs all cells (smoke preset, embedded sample), and
    reads what a person would see: no error, plotly figures drawn, both explorers answering."""
    import sys

    from tests import browser

    shots = browser.screenshot_dir(tmp_path / "screenshots")
    lab = tmp_path / "lab"
    lab.mkdir()
    for name in ("train", "explainability"):
        shutil.copy(ROOT / "notebooks" / f"{name}.ipynb", lab)
    env = {"COVIDLIB_STUDY": str(study), "COVIDLIB_DATA": ""}  # the train notebook's defaults: the embedded sample
    with browser.jupyter_lab(lab, sys.executable, env, tmp_path / "lab.log") as url, browser.chromium_page(1400, 1000) as page:
        for name in ("train", "explainability"):
            browser.run_all_cells(page, url.format(f"{name}.ipynb"))
            assert not browser.error_outputs(page), browser.error_outputs(page)
            assert not [e for e in page.errors if e.startswith("JupyterLab dialog")], page.errors
            assert page.locator(".js-plotly-plot .main-svg").count() > 0, f"no plotly figure drew in {name}"
            page.screenshot(path=str(shots / f"jupyterlab-{name}.png"))
        browser.exercise(browser.Explorer(page), shots, "jupyterlab-explorer")  # the kernel-free one works here too
        model, method = browser.widget_dropdown(page, "model"), browser.widget_dropdown(page, "method")
        picture = page.locator("img.widget-image").first
        picture.scroll_into_view_if_needed()
        for name, has_cam in (("MobileNet", True), ("Basic CNN", False)):  # the first differs from the start
            if model.locator("option:checked").inner_text() == name:
                continue
            before = browser.picture_bytes(picture)
            model.select_option(label=name)
            browser.wait_for_new_picture(page, picture, before)
            assert ("cam" in method.locator("option").all_inner_texts()) == has_cam  # only what the model has
        page.screenshot(path=str(shots / "jupyterlab-live-explorer.png"))
