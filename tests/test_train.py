from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from covidlib import CovidlibError
from covidlib.cli import main
from covidlib.models import contract as contract_mod
from covidlib.models import train as train_mod
from covidlib.models.config import resolve
from covidlib.models.runs import RunFolder
from covidlib.models.train import train


def _cli(args, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "covidlib.cli", *args], env=env, capture_output=True, text=True,
                          timeout=600)


SMALL = ["train", "--arch", "basic_cnn", "--preset", "smoke", "--max-images", "64", "--epochs", "4", "--seed", "7"]


def test_augmented_training_under_determinism_prints_no_native_log_lines(tmp_path, sample_data):
    """Random augmentation in a parallel tf.data map made TF 2.21 log an E0000 line every epoch."""
    out = _cli([*SMALL, "--data", str(sample_data), "--augment", "--deterministic", "--out", str(tmp_path / "r")])
    assert out.returncode == 0, out.stderr
    assert "E0000" not in out.stderr and "use_unbounded_threadpool" not in out.stderr, out.stderr[-2000:]


@pytest.mark.slow
def test_basic_cnn_learns_on_real_slices(tmp_path, sample_data):
    config = resolve("basic_cnn", "smoke", data=str(sample_data), max_images=200, epochs=40, patience=40, seed=1)
    run = train(config, run_dir=tmp_path / "run")
    metrics = json.loads((run / "metrics.json").read_text())
    history = pd.read_csv(run / "history.csv")
    # 200 real slices: the model fits its training set and ranks unseen slices better than chance
    assert history["accuracy"].max() > 0.7
    assert metrics["auc"] > 0.7, metrics
    record = json.loads((run / "run.json").read_text())
    assert record["data"]["manifest_hash"] and record["split"]["sha256"] and record["versions"]["tensorflow"]
    assert record["config"]["arch"] == "basic_cnn"
    preds = pd.read_csv(run / "predictions.csv")
    assert set(preds.columns) == {"path", "split", "y", "p_covid"} and set(preds["split"]) == {"val", "test"}


def test_same_seed_same_metrics(tmp_path, sample_data):
    runs = [train(resolve("basic_cnn", "smoke", data=str(sample_data), seed=3, epochs=2), run_dir=tmp_path / f"r{i}")
            for i in range(2)]
    a, b = (pd.read_csv(r / "predictions.csv") for r in runs)
    assert a["p_covid"].tolist() == b["p_covid"].tolist()


def test_resume_after_sigkill_after_the_best_epoch_replays_the_uninterrupted_run(tmp_path, sample_data):
    """Killed after epoch 6 of 8 (its best epoch is earlier), with dropout and augmentation drawing
    random numbers: the resumed run's whole history and predictions equal the uninterrupted run's."""
    args = ["train", "--arch", "basic_cnn", "--preset", "smoke", "--max-images", "64", "--epochs", "8",
            "--patience", "8", "--seed", "3", "--augment", "--data", str(sample_data)]
    full = _cli([*args, "--out", str(tmp_path / "full")])
    assert full.returncode == 0, full.stderr[-2000:]
    best = json.loads((tmp_path / "full" / "run.json").read_text())["best_epoch"]
    assert best < 6, "the premise: the best epoch comes before the kill"
    killed = _cli([*args, "--out", str(tmp_path / "killed")], {"COVIDLIB_FAULT_AFTER_EPOCH": "6"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (tmp_path / "killed" / "metrics.json").exists()
    assert json.loads((tmp_path / "killed" / "checkpoint" / "state.json").read_text())["epoch"] == 6
    resumed = _cli([*args, "--out", str(tmp_path / "killed"), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming basic_cnn from epoch 6" in resumed.stderr
    history = [pd.read_csv(tmp_path / run / "history.csv").drop(columns="seconds") for run in ("full", "killed")]
    pd.testing.assert_frame_equal(*history)
    assert json.loads((tmp_path / "killed" / "run.json").read_text())["best_epoch"] == best
    a, b = (pd.read_csv(tmp_path / run / "predictions.csv") for run in ("full", "killed"))
    assert a["p_covid"].tolist() == b["p_covid"].tolist()


def test_frozen_mode_reuses_feature_cache(tmp_path, sample_data, monkeypatch):
    config = dict(data=str(sample_data), mode="frozen", input_size=32, epochs=3, seed=5)
    first = train(resolve("mobilenet", "smoke", **config), run_dir=tmp_path / "a")

    def no_backbone_pass(*a, **k):
        raise AssertionError("backbone features were recomputed")

    monkeypatch.setattr(train_mod, "feature_model", no_backbone_pass)
    second = train(resolve("mobilenet", "smoke", **config), run_dir=tmp_path / "b")
    a, b = (pd.read_csv(r / "predictions.csv") for r in (first, second))
    assert a["p_covid"].round(6).tolist() == b["p_covid"].round(6).tolist()
    assert json.loads((second / "run.json").read_text())["inference_images_per_second"] > 0


def test_another_seed_keeps_the_backbone_seeds_features_and_draws_its_own_head(tmp_path, sample_data, monkeypatch):
    """A study's extra seeds: the random frozen backbone is the main seed's (no second feature pass),
    the head is drawn from the run's own seed."""
    from covidlib.models.runs import RunFolder

    config = dict(data=str(sample_data), mode="frozen", input_size=32, epochs=3, backbone_seed=5)
    first = train(resolve("mobilenet", "smoke", seed=5, **config), run_dir=tmp_path / "a")
    monkeypatch.setattr(train_mod, "feature_model", lambda *a, **k: pytest.fail("backbone features were recomputed"))
    second = train(resolve("mobilenet", "smoke", seed=6, **config), run_dir=tmp_path / "b")
    a, b = (RunFolder(r).load_model() for r in (first, second))
    for wa, wb in zip(contract_mod.backbone(a).get_weights(), contract_mod.backbone(b).get_weights(), strict=True):
        np.testing.assert_array_equal(wa, wb)
    assert not np.allclose(contract_mod.classifier(a).get_weights()[0], contract_mod.classifier(b).get_weights()[0])
    settings = json.loads((second / "run.json").read_text())["config"]
    assert (settings["seed"], settings["backbone_seed"]) == (6, 5)
    assert resolve("mobilenet", "smoke", seed=5, backbone_seed=5).backbone_seed is None  # one spelling, one identity


def test_frozen_predictions_equal_the_saved_full_model(tmp_path, sample_data):
    """The head over cached features stands in for the full model: the saved model must agree."""
    import keras

    from covidlib.data.dataset import load_dataset
    from covidlib.data.images import decoded, take

    config = resolve("resnet101", "smoke", data=str(sample_data), mode="frozen", input_size=32, epochs=3, seed=2)
    run = train(config, run_dir=tmp_path / "run")
    preds = pd.read_csv(run / "predictions.csv")
    dataset = load_dataset(sample_data)
    images, _ = take(decoded(dataset, 32), preds["path"].tolist())
    # the random backbone is saved as the recipe of its draw, not as 170 MB of weights
    assert not (run / "model.keras").exists() and (run / "model-recipe.json").exists()
    assert sum(f.stat().st_size for f in run.rglob("*") if f.is_file()) < 2e6
    keras.utils.set_random_seed(99)  # loading draws the backbone from the run's seed, whatever came before
    full = contract_mod.covid_probability(RunFolder(run).load_model().predict(images.astype("float32"), verbose=0))
    assert preds["p_covid"].std() > 0  # a trained head, not a constant
    assert abs(full - preds["p_covid"].to_numpy()).max() < 1e-4
    np.save(tmp_path / "images.npy", images.astype("float32"))  # and in a fresh process, as a later reader loads it
    script = ("import sys, numpy as np; from covidlib.models.runs import RunFolder; "
              "from covidlib.models.contract import predict_covid; "
              "np.save(sys.argv[2], predict_covid(RunFolder(sys.argv[1]).load_model(), np.load(sys.argv[3])))")
    subprocess.run([sys.executable, "-c", script, str(run), str(tmp_path / "p.npy"), str(tmp_path / "images.npy")],
                   check=True, capture_output=True)
    assert abs(np.load(tmp_path / "p.npy") - preds["p_covid"].to_numpy()).max() < 1e-4


def test_a_random_backbone_that_draws_otherwise_is_refused_in_one_line(tmp_path, sample_data):
    config = resolve("densenet201", "smoke", data=str(sample_data), mode="frozen", input_size=32, epochs=1, seed=3)
    run = RunFolder(train(config, run_dir=tmp_path / "run"))
    made = json.loads(run.model_recipe_file.read_text())
    run.model_recipe_file.write_text(json.dumps({**made, "seed": made["seed"] + 1}))
    with pytest.raises(CovidlibError, match=r"model-recipe.json: the random densenet201 backbone drawn again "
                                            r"from seed 4 differs from the trained one .* retrain the run$"):
        run.load_model()
    run.model_recipe_file.write_text(json.dumps(made))
    run.model_trained_file.write_bytes(run.model_trained_file.read_bytes()[:100])  # truncated
    with pytest.raises(CovidlibError, match=r"model-trained.npz cannot be read \(.*\); the run folder is damaged$"):
        run.load_model()


def test_existing_run_folder_needs_resume(tmp_path, sample_data, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "x").write_text("")
    assert main([*SMALL, "--data", str(sample_data), "--out", str(tmp_path / "run")]) == 2
    assert "--resume" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, words",
    [(["--arch", "lenet"], "valid: basic_cnn"), (["--arch", "vgg16", "--preset", "gpu9"], "valid: cpu, paper, smoke"),
     (["--arch", "vgg16", "--mode", "half"], "valid: scratch, frozen, finetune"),
     (["--arch", "vgg16", "--epochs", "0"], "--epochs must be between 1 and 100000, got 0"),
     (["--arch", "vgg16", "--dropout", "1.5"], "--dropout must be between 0.0 and 0.95, got 1.5"),
     (["--arch", "vgg16", "--seed", "-1"], "argument --seed: must be between 0 and 2147483647, got -1"),
     (["--arch", "vgg16", "--input-size", "100000"], "--input-size must be between 16 and 1024, got 100000")],
)
def test_bad_train_options_are_one_line(args, words, capsys):
    try:
        code = main(["train", *args])
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err


def test_a_one_class_test_split_is_refused_and_leaves_no_run_folder(tmp_path, sample_data, capsys):
    from covidlib.data.dataset import load_dataset
    from covidlib.data.splits import make_split

    split = make_split(load_dataset(sample_data), "random")
    split.table = split.table[(split.table["split"] != "test") | (split.table["label"] == "COVID")]
    path = split.save(tmp_path / "one-class.csv")
    run = tmp_path / "run"
    assert main([*SMALL, "--data", str(sample_data), "--split", str(path), "--out", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"covidlib: error: the test split of {path} holds only COVID images; it needs both classes"]
    assert not run.exists()  # nothing half-made, so a retry with a good split needs no --resume


def test_an_error_after_tensorflow_loads_is_still_the_only_line_on_stderr(tmp_path, sample_data):
    """TensorFlow's native start-up lines (oneDNN, CUDA probing) must not come before the error."""
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label,split\nCOVID/not-there.png,COVID,test\n")
    done = _cli([*SMALL, "--data", str(sample_data), "--split", str(bad), "--out", str(tmp_path / "run")])
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"covidlib: error: split file {bad} names 1 images not in {sample_data}, "
                                        "e.g. COVID/not-there.png"]


def test_a_second_writer_into_the_same_run_folder_is_refused(tmp_path, sample_data):
    import time

    args = ["train", "--arch", "basic_cnn", "--preset", "smoke", "--max-images", "64", "--epochs", "12",
            "--patience", "12", "--data", str(sample_data), "--out", str(tmp_path / "run")]
    first = subprocess.Popen([sys.executable, "-m", "covidlib.cli", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (tmp_path / "run" / "checkpoint").exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert first.poll() is None, "the first run ended before the second could start"
    second = _cli([*args, "--resume"])  # even --resume must not write into a run that is being written
    assert second.returncode == 2
    assert second.stderr.splitlines() == [f"covidlib: error: run folder {tmp_path / 'run'} is being written by "
                                          "another process; wait for it or pass another --out"]
    assert first.wait(timeout=600) == 0
    from covidlib.data.splits import file_hash

    record = json.loads((tmp_path / "run" / "run.json").read_text())  # one writer: its split, its model
    assert record["split"]["sha256"] == file_hash(tmp_path / "run" / "split.csv")


@pytest.mark.parametrize("preset_text, words", [
    ("defaults: {epochs: two}", "--epochs must be a whole number, got 'two' (preset "),
    ("defaults: {batch_size: 1.5}", "--batch-size must be a whole number, got 1.5 (preset "),
    ("defaults: {learning_rate: fast}", "--learning-rate must be a number, got 'fast' (preset "),
    ("defaults: {augment: maybe}", "--augment must be true or false, got 'maybe' (preset "),
    ("defaults: [epochs, 2]", "'defaults' must be a mapping of settings, got list"),
    ("archs: {basic_cnn: [1, 2]}", "'archs: basic_cnn' must be a mapping of settings, got list"),
    ("- just a list", "must be a mapping with 'defaults' and 'archs', got list"),
])
def test_a_preset_with_wrong_types_is_one_line(tmp_path, preset_text, words, capsys):
    preset = tmp_path / "mine.yaml"
    preset.write_text(preset_text + "\n")
    assert main(["train", "--arch", "basic_cnn", "--preset", str(preset), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not (tmp_path / "run").exists()


def test_skipped_files_are_said_and_recorded_in_the_run(tmp_path, capsys):
    from tests.conftest import make_folder

    root = make_folder(tmp_path / "d", n=10)
    (root / "COVID" / "broken.png").write_bytes(b"not a png")
    assert main(["train", "--arch", "basic_cnn", "--preset", "smoke", "--epochs", "1", "--data", str(root),
                 "--skip-bad", "--out", str(tmp_path / "run")]) == 0
    assert f"covidlib: skipped 1 unusable file in {root} (first: COVID/broken.png" in capsys.readouterr().err
    skipped = json.loads((tmp_path / "run" / "run.json").read_text())["data"]["skipped"]
    assert [s["path"] for s in skipped] == ["COVID/broken.png"]


def test_resuming_with_other_settings_is_refused(tmp_path, sample_data):
    args = ["train", "--arch", "basic_cnn", "--preset", "smoke", "--max-images", "64", "--epochs", "4", "--seed", "7",
            "--data", str(sample_data), "--out", str(tmp_path / "run")]
    killed = _cli(args, {"COVIDLIB_FAULT_AFTER_EPOCH": "1"})
    assert killed.returncode == -9
    identity = json.loads((tmp_path / "run" / "identity.json").read_text())
    assert identity["seed"] == 7 and identity["split_kind"] == "random" and len(identity["manifest_sha256"]) == 64
    other = _cli([*args[:-2], "--learning-rate", "0.01", "--out", str(tmp_path / "run"), "--resume"])
    assert other.returncode == 2
    assert other.stderr.splitlines() == [f"covidlib: error: run folder {tmp_path / 'run'} was started with "
                                         "learning_rate = 0.0003, not 0.01; resume it with the same settings or "
                                         "pass another --out"]
    same = _cli([*args, "--resume"])
    assert same.returncode == 0, same.stderr[-2000:]
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["identity"]["config_sha256"] == identity["config_sha256"]
    assert record["device"] == {"device": "CPU", "gpus": 0, "replicas": 1, "strategy": "default",
                                "mixed_precision": "float32", "jit_compile": False, "deterministic_ops": True}


@pytest.mark.slow
def test_a_finetune_run_killed_at_the_end_of_its_warmup_resumes_exactly(tmp_path, sample_data):
    """Killed after the last head-only epoch: the resumed process unfreezes the backbone top,
    switches the learning rate and must then replay the uninterrupted run's epochs."""
    args = ["train", "--arch", "mobilenet", "--preset", "smoke", "--mode", "finetune", "--input-size", "32",
            "--max-images", "64", "--epochs", "4", "--patience", "4", "--seed", "3", "--data", str(sample_data)]
    full = _cli([*args, "--out", str(tmp_path / "full")])
    assert full.returncode == 0, full.stderr[-2000:]
    assert "fine-tuning:" in full.stderr and "unfrozen at lr 1e-05" in full.stderr
    killed = _cli([*args, "--out", str(tmp_path / "killed")], {"COVIDLIB_FAULT_AFTER_EPOCH": "2"})
    assert killed.returncode == -9 and "fine-tuning:" not in killed.stderr
    resumed = _cli([*args, "--out", str(tmp_path / "killed"), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming mobilenet from epoch 2" in resumed.stderr and "fine-tuning:" in resumed.stderr
    history = [pd.read_csv(tmp_path / run / "history.csv").drop(columns="seconds") for run in ("full", "killed")]
    pd.testing.assert_frame_equal(*history)
    a, b = (pd.read_csv(tmp_path / run / "predictions.csv") for run in ("full", "killed"))
    assert a["p_covid"].tolist() == b["p_covid"].tolist()


def test_a_damaged_checkpoint_state_is_one_line(tmp_path, sample_data):
    args = [*SMALL, "--data", str(sample_data), "--out", str(tmp_path / "run")]
    assert _cli(args, {"COVIDLIB_FAULT_AFTER_EPOCH": "1"}).returncode == -9
    (tmp_path / "run" / "checkpoint" / "state.json").write_text('{"epoch": 1, "surprise": true}')
    done = _cli([*args, "--resume"])
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"covidlib: error: {tmp_path / 'run' / 'checkpoint' / 'state.json'}: the checkpoint state is damaged "
        "(unexpected fields)"]
