"""The evaluate / compare / baselines / explain commands on real (smoke) runs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from covidlib.cli import main
from covidlib.evaluate.baselines import BASELINES
from covidlib.models.config import resolve
from covidlib.models.train import train


@pytest.fixture(scope="module")
def runs(tmp_path_factory, sample_data):
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for arch, extra in (("basic_cnn", {}), ("mobilenet", {"mode": "frozen", "input_size": 32})):
        out[arch] = train(resolve(arch, "smoke", data=str(sample_data), seed=0, **extra), run_dir=root / arch)
    return out


def test_evaluate_prints_cis_and_writes_a_card(runs, tmp_path, capsys):
    card = tmp_path / "card.md"
    assert main(["evaluate", "--run", str(runs["basic_cnn"]), "--resamples", "200", "--json", str(tmp_path / "e.json"),
                 "--card", str(card)]) == 0
    out = capsys.readouterr().out
    assert "positive class COVID" in out and "95% CI" in out
    result = json.loads((tmp_path / "e.json").read_text())
    m = result["metrics"]["accuracy"]
    assert m["low"] <= m["value"] <= m["high"]
    text = card.read_text()
    assert "Not for clinical use" in text and "CLAIM" in text and "near-duplicate" in text
    assert text.startswith("# Model card: Basic CNN (trained from scratch, seed ")  # not "scratch, none weights"


def test_external_evaluation_on_renamed_class_folders(runs, tmp_path, sample_data, capsys):
    ext = tmp_path / "external"
    for src, dst in (("COVID", "CT_COVID"), ("non-COVID", "CT_NonCOVID")):
        (ext / dst).mkdir(parents=True)
        for p in sorted((sample_data / src).iterdir())[:6]:
            shutil.copy(p, ext / dst / p.name)
    assert main(["evaluate", "--run", str(runs["mobilenet"]), "--data", str(ext), "--resamples", "100",
                 "--json", str(tmp_path / "x.json")]) == 0
    result = json.loads((tmp_path / "x.json").read_text())
    assert result["n"] == 12 and result["evaluated_on"] == str(ext)
    assert result["image_sizes"]["external"]["width"][0] > 0 and result["image_sizes"]["training_data"]
    # copies of training images: counted, and said in one warning line
    assert result["shared_with_training_data"] == 12
    assert capsys.readouterr().err.splitlines() == [
        f"covidlib: warning: 12 of 12 images in {ext} are byte-identical to images in the training data "
        f"{sample_data}; the external result is optimistic"]


def test_the_training_data_is_not_an_external_test(runs, sample_data, capsys):
    assert main(["evaluate", "--run", str(runs["basic_cnn"]), "--data", str(sample_data)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "is the dataset basic_cnn was trained on (same manifest hash)" in err[0]


def test_compare_writes_tables_with_baselines(runs, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", str(runs["basic_cnn"]), str(runs["mobilenet"]), "--baselines", "--resamples", "100",
                 "--out", str(out)]) == 0
    table = pd.read_csv(out / "table.csv", index_col=0)
    assert {"basic_cnn", "mobilenet", *BASELINES} == set(table.index)
    pairs = pd.read_csv(out / "pairs.csv")
    assert len(pairs) == 15 and pairs["mcnemar_p_holm"].between(0, 1).all()  # every pair of 2 CNNs and 4 baselines
    assert (out / "table.md").read_text().startswith("|")


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "cam", "saliency", "activations", "heatmaps"])
def test_explain_writes_a_png(runs, tmp_path, sample_data, method):
    image = sorted((sample_data / "COVID").iterdir())[0]
    out = tmp_path / f"{method}.png"
    assert main(["explain", "--run", str(runs["mobilenet"]), "--image", str(image), "--method", method,
                 "--out", str(out)]) == 0
    arr = np.asarray(Image.open(out).convert("RGB"))
    # the PNG is exactly the overlay the library makes for the same run, image and method
    from covidlib.data.images import read_image
    from covidlib.explain.layers import activations, feature_grid, feature_map_layers, heatmap, overlay
    from covidlib.explain.maps import explain
    from covidlib.models.runs import RunFolder

    img = read_image(image, 32)
    model = RunFolder(runs["mobilenet"]).load_model()  # a random backbone: drawn again from its recipe
    if method in ("activations", "heatmaps"):
        layer = feature_map_layers(model)[0]
        acts = activations(model, img, [layer])[layer]
        expected = (np.repeat(feature_grid(acts)[..., None], 3, axis=-1) if method == "activations"
                    else overlay(img, heatmap(acts, img.shape[:2])))
    else:
        expected = overlay(img, explain(model, img, method)[0])
    np.testing.assert_array_equal(arr, expected)


@pytest.mark.parametrize(
    "args, words",
    [(["evaluate", "--run", "/no/run"], "not a finished covidlib run"),
     (["explain", "--run", "RUN", "--image", "/no/img.png", "--method", "gradcam", "--out", "o.png"], "does not exist"),
     (["explain", "--run", "RUN", "--image", "IMG", "--method", "magic", "--out", "o.png"], "invalid choice"),
     (["explain", "--run", "RUN", "--image", "IMG", "--method", "gradcam", "--layer", "nope", "--out", "o.png"],
      "unknown layer 'nope'")],
)
def test_bad_inputs_are_one_line(runs, sample_data, tmp_path, args, words, capsys):
    image = str(sorted((sample_data / "COVID").iterdir())[0])
    args = [a.replace("RUN", str(runs["mobilenet"])).replace("IMG", image) for a in args]
    args = [str(tmp_path / a) if a == "o.png" else a for a in args]
    try:
        code = main(args)
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not (tmp_path / "o.png").exists()


def test_baselines_command(sample_data, capsys):
    assert main(["baselines", "--data", str(sample_data)]) == 0
    out = capsys.readouterr().out
    assert "size_only" in out and "nearest_neighbour" in out and "histogram_size" in out


def test_compare_aggregates_seeds_next_to_the_paper(tmp_path, sample_data, capsys):
    from covidlib.data.dataset import load_dataset
    from covidlib.data.splits import make_split

    split = make_split(load_dataset(sample_data), "random", seed=0).save(tmp_path / "split.csv")
    runs = [train(resolve("basic_cnn", "smoke", data=str(sample_data), seed=s, epochs=1, split=str(split)),
                  run_dir=tmp_path / f"s{s}") for s in (1, 2)]  # two seeds, one test set
    assert main(["compare", *map(str, runs), "--resamples", "100", "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert "basic_cnn: accuracy over 2 seeds" in out and "the paper's best of trials: 96.57%" in out


def test_resamples_out_of_range_is_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "--run", "anything", "--resamples", "-5"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "covidlib: error: argument --resamples: must be between 100 and 100000, got -5"]


@pytest.mark.parametrize("damage, command, words", [
    (lambda r: (r / "run.json").write_text('{"config": {"arch": '), "evaluate", "run.json: the run record is damaged"),
    (lambda r: (r / "run.json").unlink(), "explain", "run.json is missing; the run folder is damaged"),
    (lambda r: (r / "predictions.csv").write_text("a,b\n1,2\n"), "evaluate",
     "predictions.csv lacks columns: p_covid, path, y"),
    (lambda r: (r / "model.keras").write_bytes((r / "model.keras").read_bytes()[:500]), "explain",
     "model.keras cannot be loaded"),
])
def test_a_damaged_run_folder_is_one_line(runs, tmp_path, sample_data, damage, command, words, capsys):
    run = tmp_path / "run"
    shutil.copytree(runs["basic_cnn"], run)
    damage(run)
    image = next((sample_data / "COVID").iterdir())
    args = {"evaluate": ["evaluate", "--run", str(run)],
            "explain": ["explain", "--run", str(run), "--image", str(image), "--method", "gradcam",
                        "--out", str(tmp_path / "x.png")]}[command]
    assert main(args) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not (tmp_path / "x.png").exists()


def test_skip_bad_works_where_the_message_suggests_it_and_says_what_it_skipped(runs, tmp_path, sample_data, capsys):
    ext = tmp_path / "external"
    for src, dst in (("COVID", "CT_COVID"), ("non-COVID", "CT_NonCOVID")):
        (ext / dst).mkdir(parents=True)
        for p in sorted((sample_data / src).iterdir())[-4:]:
            Image.open(p).rotate(90).save(ext / dst / p.name)  # not byte-identical to the training images
    (ext / "CT_COVID" / "broken.png").write_bytes(b"\x89PNG broken")
    args = ["evaluate", "--run", str(runs["basic_cnn"]), "--data", str(ext), "--resamples", "100"]
    assert main(args) == 2
    assert "--skip-bad skips it" in capsys.readouterr().err
    assert main([*args, "--skip-bad", "--json", str(tmp_path / "r.json")]) == 0
    assert capsys.readouterr().err.splitlines() == [
        f"covidlib: skipped 1 unusable file in {ext} (first: CT_COVID/broken.png: corrupt or truncated image "
        "(cannot identify image file "
        f"'{ext / 'CT_COVID' / 'broken.png'}'))"]
    assert json.loads((tmp_path / "r.json").read_text())["n"] == 8
