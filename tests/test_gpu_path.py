"""The GPU path (the `paper` preset's code) on CPU stand-ins: the device policy, several devices
(logical CPUs under MirroredStrategy), fine-tuning, weights from a file, mixed precision."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from covidlib import runtime as runtime_mod
from covidlib.models.config import resolve
from covidlib.models.train import train


@pytest.mark.parametrize("gpus, asked, expected", [
    (0, None, {"device": "CPU", "mixed_precision": "float32", "jit_compile": False, "deterministic_ops": True}),
    (1, None, {"device": "GPU", "mixed_precision": "mixed_float16", "jit_compile": True, "deterministic_ops": False}),
    # determinism asked on a GPU: never together with XLA (no deterministic XLA MaxPool gradient)
    (1, True, {"device": "GPU", "mixed_precision": "mixed_float16", "jit_compile": False, "deterministic_ops": True}),
    (2, None, {"device": "GPU", "strategy": "MirroredStrategy", "replicas": 2, "jit_compile": True}),
])
def test_the_device_policy(monkeypatch, gpus, asked, expected):
    monkeypatch.setattr(runtime_mod, "gpus", lambda: ["GPU"] * gpus)
    monkeypatch.delenv(runtime_mod.CPU_DEVICES_ENV, raising=False)
    policy = runtime_mod.device_policy(asked)
    assert {k: policy[k] for k in expected} == expected
    assert not (policy["jit_compile"] and policy["deterministic_ops"])


def _cli(args, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "covidlib.cli", *args], env=env, capture_output=True, text=True,
                          timeout=900)


@pytest.mark.slow
def test_two_devices_finetune_killed_after_the_unfreeze_resumes_exactly(tmp_path, sample_data):
    """MirroredStrategy over two logical CPUs: build, compile after the unfreeze, and restore all
    run in the strategy's scope, and the resumed run ends equal to the uninterrupted one."""
    two = {runtime_mod.CPU_DEVICES_ENV: "2"}
    args = ["train", "--arch", "mobilenet", "--preset", "smoke", "--mode", "finetune", "--input-size", "32",
            "--max-images", "64", "--epochs", "4", "--patience", "4", "--seed", "5", "--batch-size", "16",
            "--data", str(sample_data)]
    full = _cli([*args, "--out", str(tmp_path / "full")], two)
    assert full.returncode == 0, full.stderr[-3000:]
    record = json.loads((tmp_path / "full" / "run.json").read_text())
    assert record["device"]["strategy"] == "MirroredStrategy" and record["device"]["replicas"] == 2
    killed = _cli([*args, "--out", str(tmp_path / "killed")], {**two, "COVIDLIB_FAULT_AFTER_EPOCH": "3"})
    assert killed.returncode == -9 and "fine-tuning:" in killed.stderr  # killed after the unfreeze
    resumed = _cli([*args, "--out", str(tmp_path / "killed"), "--resume"], two)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming mobilenet from epoch 3" in resumed.stderr
    history = [pd.read_csv(tmp_path / run / "history.csv").drop(columns="seconds") for run in ("full", "killed")]
    pd.testing.assert_frame_equal(*history)
    a, b = (pd.read_csv(tmp_path / run / "predictions.csv") for run in ("full", "killed"))
    assert a["p_covid"].tolist() == b["p_covid"].tolist()


@pytest.mark.slow
@pytest.mark.parametrize("name, size", [("vgg16", 32), ("resnet101", 32), ("densenet201", 32), ("inceptionv3", 75)])
def test_finetune_trains_the_head_then_the_top_of_the_backbone_with_batchnorm_frozen(name, size, tmp_path,
                                                                                      sample_data, capfd):
    from covidlib.data.dataset import load_dataset
    from covidlib.data.splits import make_split
    from covidlib.models.architectures import build_model
    from covidlib.models.contract import backbone, classifier, load_model
    from covidlib.runtime import apply_policy, device_policy

    # no validation split, so the final weights are the last epoch's (not the best epoch's, maybe the warm-up)
    split = make_split(load_dataset(sample_data), "random", val_fraction=0).save(tmp_path / "split.csv")
    config = resolve(name, "smoke", data=str(sample_data), split=str(split), mode="finetune", input_size=size,
                     max_images=32, epochs=2, warmup_epochs=1, unfreeze_fraction=0.3, seed=11, batch_size=16)
    apply_policy(device_policy(), config.seed)  # the initial weights train() starts from
    start = build_model(name, input_size=size, mode="finetune", loss=config.loss)
    run = train(config, run_dir=tmp_path / "run")
    assert f"unfrozen at lr {config.finetune_learning_rate}" in capfd.readouterr().err  # the learning rate switched
    done = load_model(run / "model.keras")
    layers_before, layers_after = backbone(start).layers, backbone(done).layers
    cut = int(len(layers_after) * (1 - config.unfreeze_fraction))
    changed = [not all(np.array_equal(a, b) for a, b in zip(x.get_weights(), y.get_weights()))
               for x, y in zip(layers_before, layers_after)]
    kinds = [type(layer).__name__ for layer in layers_after]
    assert not any(changed[:cut]), "a layer below the unfrozen top changed"
    assert not any(c for c, k in zip(changed, kinds) if k == "BatchNormalization"), "BatchNorm moved"
    assert any(c for c, k in zip(changed[cut:], kinds[cut:]) if k != "BatchNormalization"), "the top did not train"
    assert not np.array_equal(classifier(start).get_weights()[0], classifier(done).get_weights()[0])


@pytest.mark.slow
def test_weights_from_a_file_load_into_the_backbone_end_to_end(tmp_path, sample_data):
    """The offline stand-in for ImageNet weights: a saved no-top backbone, passed as --weights PATH."""
    import keras

    from covidlib.cli import main
    from covidlib.models.contract import backbone, load_model

    source = keras.applications.MobileNet(include_top=False, weights=None, input_shape=(32, 32, 3))
    for w in source.weights:  # not what a fresh build would draw (variances stay positive)
        w.assign(np.asarray(w) * 1.5 + 0.01)
    path = tmp_path / "mobilenet.weights.h5"
    source.save_weights(path)
    assert main(["train", "--arch", "mobilenet", "--preset", "smoke", "--mode", "frozen", "--input-size", "32",
                 "--weights", str(path), "--data", str(sample_data), "--out", str(tmp_path / "run")]) == 0
    loaded = backbone(load_model(tmp_path / "run" / "model.keras"))
    x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(loaded(x, training=False)), np.asarray(source(x, training=False)),
                               atol=1e-5)


@pytest.mark.slow
def test_mixed_precision_on_cpu_keeps_a_float32_head_and_the_maps_of_float32(tmp_path, sample_data):
    """float16 compute with a float32 head trains; its gradient maps match the same weights run in
    float32 (the float16 backward pass is loss-scaled, so small gradients do not vanish)."""
    import keras

    from covidlib.data.images import read_image
    from covidlib.explain import maps as maps_mod
    from covidlib.explain import sanity as sanity_mod
    from covidlib.models.architectures import build_model
    from covidlib.models.contract import classifier, load_model

    config = resolve("basic_cnn", "smoke", data=str(sample_data), mixed_precision=True, epochs=2, seed=2)
    try:
        run = train(config, run_dir=tmp_path / "run")
        assert json.loads((run / "run.json").read_text())["device"]["mixed_precision"] == "mixed_float16"
        mixed = load_model(run / "model.keras")
        assert classifier(mixed).dtype_policy.compute_dtype == "float32"
        assert any(getattr(layer, "compute_dtype", "") == "float16" for layer in mixed.layers)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    twin = build_model("basic_cnn", input_size=32)  # the same weights, computed in float32
    twin.set_weights(mixed.get_weights())
    paths = pd.read_csv(run / "predictions.csv")["path"][:16]
    images = np.stack([read_image(sample_data / p, 32) for p in paths])
    for method in ("gradcam", "saliency"):
        for cls in ("covid", "non-covid"):
            half, full = maps_mod.explain(mixed, images, method, class_name=cls), maps_mod.explain(twin, images, method, class_name=cls)
            assert half.dtype == np.float32 and np.isfinite(half).all()
            # A 2-epoch model at chance leaves many Grad-CAM maps blank or barely above zero after the
            # ReLU, and float16 rounding can tip such a map either way (seen on one CPU, not another):
            # where both maps show something, where they point must not move; few may tip.
            shown = [(a, b) for a, b in zip(half, full) if a.max() > 0 and b.max() > 0]
            tipped = sum((a.max() > 0) != (b.max() > 0) for a, b in zip(half, full))
            ranks = [sanity_mod.rank_similarity(a, b) for a, b in shown]
            assert len(ranks) >= 2 and min(ranks) > 0.85 and tipped <= 4, (method, cls, ranks, tipped)
            assert np.abs(half - full)[[a.max() > 0 and b.max() > 0 for a, b in zip(half, full)]].mean() < 0.05
        assert (half.reshape(len(half), -1).max(axis=1) == 1.0).any(), method


@pytest.mark.slow
def test_the_gpu_check_script_reports_each_architecture_and_fails_loudly(tmp_path, sample_data):
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"
    ok = subprocess.run([sys.executable, str(script), "--smoke", "--images", "24", "--archs", "basic_cnn",
                         "--data", str(sample_data), "--out", str(tmp_path / "check.json")],
                        capture_output=True, text=True, timeout=900)
    assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr[-2000:]
    assert "policy: {'device': 'CPU'" in ok.stdout and "all architectures ran" in ok.stdout
    result = json.loads((tmp_path / "check.json").read_text())["results"][0]
    assert result["steps"] == {"train": "ok", "gradcam": "ok"} and result["train_images_per_second"] > 0
    broken = tmp_path / "no-data"
    broken.mkdir()
    bad = subprocess.run([sys.executable, str(script), "--smoke", "--archs", "basic_cnn", "--data", str(broken)],
                         capture_output=True, text=True, timeout=900)
    assert bad.returncode == 1 and "FAILED: basic_cnn" in bad.stdout and "has no class folders" in bad.stdout
