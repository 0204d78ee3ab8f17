"""Where a notebook runs decides its study, its data and its plotly renderer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from covidlib import CovidlibError
from covidlib import notebook as notebook_mod


def _fake_run(study: Path, key: str, split_kind: str = "random") -> Path:
    run = study / "runs" / key
    run.mkdir(parents=True)
    (run / "metrics.json").write_text("{}")
    (run / "predictions.csv").write_text("path,y,p_covid\n")
    (run / "run.json").write_text(json.dumps({"split": {"kind": split_kind}}))
    return run


def test_the_newest_study_under_studies_is_found_from_the_working_folder_or_its_parent(tmp_path, monkeypatch):
    monkeypatch.delenv("COVIDLIB_STUDY", raising=False)
    older, newer = tmp_path / "studies" / "smoke", tmp_path / "studies" / "cpu"
    _fake_run(older, "basic_cnn-random")
    _fake_run(newer, "basic_cnn-random")
    os.utime(older / "runs", (time.time() - 3600,) * 2)
    (tmp_path / "studies" / "empty").mkdir()  # a study folder with no finished run is never chosen
    (tmp_path / "notebooks").mkdir()
    monkeypatch.chdir(tmp_path / "notebooks")  # where JupyterLab starts a kernel in a clone
    assert notebook_mod.find_study() == newer.resolve()
    monkeypatch.chdir(tmp_path)
    assert notebook_mod.find_study() == newer.resolve()
    monkeypatch.setenv("COVIDLIB_STUDY", str(older))
    assert notebook_mod.find_study() == older.resolve()
    assert notebook_mod.find_study(newer) == newer.resolve()  # an explicit study_dir wins over the environment


def test_no_study_anywhere_is_none_or_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.delenv("COVIDLIB_STUDY", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("covidlib.notebook.repository_root", lambda: None)
    assert notebook_mod.find_study(train_if_missing=False) is None
    with pytest.raises(CovidlibError, match="holds no finished runs; run `covidlib study --out") as err:
        notebook_mod.find_study(tmp_path / "nowhere")
    assert "\n" not in str(err.value)


def test_colab_defaults_fetch_the_full_dataset_only_on_colab(tmp_path, monkeypatch):
    monkeypatch.delenv("COVIDLIB_DATA", raising=False)
    assert notebook_mod.colab_defaults("smoke", None) == ("smoke", None)  # not Colab: nothing changes
    stand_in = tmp_path / "stand-in"
    (stand_in / "google" / "colab").mkdir(parents=True)
    (stand_in / "google" / "colab" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(stand_in))
    for name in [m for m in sys.modules if m == "google" or m.startswith("google.colab")]:
        monkeypatch.delitem(sys.modules, name)
    assert notebook_mod.in_colab()
    fetched = tmp_path / "kaggle"
    monkeypatch.setattr("covidlib.notebook.fetch", lambda *a, **k: fetched)
    assert notebook_mod.colab_defaults("smoke", None) == ("smoke", str(fetched))  # no GPU here: the preset stays
    assert notebook_mod.colab_defaults("cpu", "/mine") == ("cpu", "/mine")  # an explicit folder wins
    monkeypatch.setenv("COVIDLIB_DATA", "/drive/data")
    assert notebook_mod.colab_defaults("smoke", None) == ("smoke", "/drive/data")


@pytest.mark.parametrize("book", [True, False])
def test_plotly_keeps_its_own_renderer_unless_a_study_builds_the_book(book):
    """In a fresh interpreter: plotly's import-time choice survives setup() unless COVIDLIB_BOOK is set."""
    code = ("import plotly.io as pio; before = pio.renderers.default\n"
            "from covidlib import notebook as nb; after = nb.setup()['plotly_renderer']\n"
            "print(repr(before), repr(after))")
    env = {**os.environ, "PLOTLY_RENDERER": "svg"}  # stands in for plotly's detection (colab, vscode, ...)
    env.pop("COVIDLIB_BOOK", None)
    if book:
        env["COVIDLIB_BOOK"] = "1"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    before, after = out.split()
    assert before == "'svg'"
    assert after == ("'plotly_mimetype+covidlib_book'" if book else "'svg'")


def test_covidlib_notebooks_copies_the_five_and_will_not_overwrite_without_force(tmp_path, capsys):
    from covidlib.cli import main

    dest = tmp_path / "mine"
    assert main(["notebooks", str(dest)]) == 0
    names = sorted(p.name for p in dest.iterdir())
    assert names == ["comparison.ipynb", "dataset.ipynb", "explainability.ipynb", "train.ipynb", "validity.ipynb"]
    assert capsys.readouterr().out.splitlines() == [str(dest / n) for n in names]
    (dest / "train.ipynb").write_text("my edits")
    assert main(["notebooks", str(dest)]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert (dest / "train.ipynb").read_text() == "my edits"
    assert main(["notebooks", str(dest), "--force"]) == 0
    assert json.loads((dest / "train.ipynb").read_text())["cells"]
