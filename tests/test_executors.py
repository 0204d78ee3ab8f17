"""A study's training runs on a Dask cluster: same results as locally, a lost worker's run resumed."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from covidlib import CovidlibError
from covidlib.cli import main
from covidlib.study.folder import StudyFolder
from covidlib.study.runner import run_study

distributed = pytest.importorskip("distributed")

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ["basic_cnn", "mobilenet", "alexnet"]


def _tiny_preset(tmp_path: Path, **basic_cnn) -> Path:
    """The smoke preset with AlexNet made to fail (input too small) and the Basic CNN's settings."""
    smoke = (ROOT / "covidlib" / "presets" / "smoke.yaml").read_text()
    smoke = smoke.replace("alexnet: {input_size: 67}", "alexnet: {input_size: 20}")
    if basic_cnn:
        inner = ", ".join(f"{k}: {v}" for k, v in basic_cnn.items())
        smoke = smoke.replace("basic_cnn: {input_size: 32, learning_rate: 0.0003}", f"basic_cnn: {{{inner}}}")
    preset = tmp_path / "tiny.yaml"
    preset.write_text(smoke)
    return preset


def _study(preset, out, sample_data, **kwargs) -> Path:
    return run_study(str(preset), archs=ARCHS, data=str(sample_data), out=out, splits=["random"], book=False,
                     reports=False, cell_timeout=900, **kwargs)


@pytest.mark.slow
def test_a_dask_study_equals_the_local_one_and_isolates_a_failure(tmp_path, sample_data, capsys):
    preset = _tiny_preset(tmp_path)
    local = _study(preset, tmp_path / "local", sample_data)
    dask = _study(preset, tmp_path / "dask", sample_data, executor="dask", jobs=2)
    progress = capsys.readouterr().out
    assert "3 runs sent to the Dask scheduler" in progress and "(2 workers)" in progress
    assert "[3/3]" in progress
    for study in (local, dask):
        status = StudyFolder(study).status()
        assert status["alexnet-random"]["status"] == "failed"  # one failure, the others finish
        assert status["basic_cnn-random"]["status"] == status["mobilenet-random"]["status"] == "done"
    for run in ("basic_cnn-random", "mobilenet-random"):
        a = pd.read_csv(local / "runs" / run / "predictions.csv")
        b = pd.read_csv(dask / "runs" / run / "predictions.csv")
        pd.testing.assert_frame_equal(a, b)  # deterministic CPU training: the same numbers wherever it ran
    _study(preset, tmp_path / "dask", sample_data, executor="dask", jobs=2)  # a rerun skips what finished
    assert "basic_cnn-random finished earlier (skipped)" in capsys.readouterr().out


@pytest.mark.slow
def test_a_killed_worker_s_run_resumes_from_its_checkpoint(tmp_path, sample_data):
    from covidlib.study.executors import local_cluster

    preset = _tiny_preset(tmp_path, input_size=64, epochs=40, patience=100, learning_rate=0.0003)
    study = tmp_path / "study"
    state_file = study / "runs" / "basic_cnn-random" / "checkpoint" / "state.json"
    with local_cluster(2) as cluster, distributed.Client(cluster) as client:
        result = {}
        thread = threading.Thread(target=lambda: result.setdefault("study", run_study(
            str(preset), archs=["basic_cnn"], data=str(sample_data), out=study, splits=["random"], book=False,
            reports=False, cell_timeout=900, executor="dask", scheduler=cluster.scheduler_address)))
        thread.start()
        before = _wait_for_epoch(state_file, 3)
        assert before["epoch"] < 40 and not (study / "runs" / "basic_cnn-random" / "metrics.json").exists()
        busy = [w for w, keys in client.processing().items() if any("basic_cnn-random" in k for k in keys)]
        pid = client.run(os.getpid, workers=busy)[busy[0]]
        os.kill(pid, signal.SIGKILL)  # the worker and its notebook's kernel are gone mid-run
        thread.join(timeout=600)
    assert StudyFolder(study).status()["basic_cnn-random"]["status"] == "done"
    history = pd.read_csv(study / "runs" / "basic_cnn-random" / "history.csv")
    assert list(history["epoch"]) == list(range(1, 41))  # every epoch once: nothing written twice
    notebook = (study / "notebooks" / "train_basic_cnn-random.ipynb").read_text()
    assert "epoch 40/40" in notebook and "epoch 1/40" not in notebook  # the second execution began past epoch 1
    kept = pd.DataFrame(before["history"])
    # the epochs before the kill were not retrained: the same losses and the same measured seconds
    pd.testing.assert_frame_equal(history.iloc[: len(kept)][kept.columns].reset_index(drop=True), kept,
                                  check_dtype=False)


def _wait_for_epoch(state_file: Path, epoch: int, timeout: float = 300) -> dict:
    import json

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = json.loads(state_file.read_text())
            if state["epoch"] >= epoch:
                return state
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"{state_file} never reached epoch {epoch}")


def test_a_scheduler_that_does_not_answer_is_one_line(tmp_path, sample_data, capsys):
    code = main(["study", "--preset", "smoke", "--archs", "basic_cnn", "--splits", "random", "--data", str(sample_data),
                 "--executor", "dask", "--scheduler", "tcp://127.0.0.1:9", "--out", str(tmp_path / "s"), "--no-book"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("covidlib: error: --scheduler tcp://127.0.0.1:9: no Dask scheduler answered")
    assert not (tmp_path / "s").exists()  # nothing written for a study that could not start


def test_scheduler_without_dask_executor_is_refused(tmp_path, sample_data, capsys):
    code = main(["study", "--preset", "smoke", "--data", str(sample_data), "--scheduler", "tcp://127.0.0.1:9",
                 "--out", str(tmp_path / "s")])
    assert code == 2 and capsys.readouterr().err.strip() == "covidlib: error: --scheduler needs --executor dask"


class _RemoteWorker:
    """A client whose one worker has its own disks: the study's paths do not exist there."""

    def run(self, fn, paths, token_file, token):
        return {"tcp://10.0.0.7:40123": fn([f"/elsewhere{p}" for p in paths], f"/elsewhere{token_file}", token)}


def test_a_worker_that_cannot_see_the_study_folder_is_one_line(tmp_path):
    from covidlib.study.executors import check_shared_storage

    with pytest.raises(CovidlibError) as err:
        check_shared_storage(_RemoteWorker(), [tmp_path, tmp_path / "data"])
    assert str(err.value) == (f"Dask worker tcp://10.0.0.7:40123 cannot see /elsewhere{tmp_path}; the study folder "
                              "and the data must be on storage every worker shares, at the same path")
    assert not list(tmp_path.glob(".shared-storage-check-*"))  # the token file is removed again


def test_a_local_cluster_pins_one_worker_to_each_gpu(monkeypatch):
    from covidlib.study.executors import worker_specs

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    specs = worker_specs(jobs=1, gpus=2)
    assert {name: s["options"]["env"] for name, s in specs.items()} == {
        "gpu-2": {"CUDA_VISIBLE_DEVICES": "2"}, "gpu-3": {"CUDA_VISIBLE_DEVICES": "3"}}
    assert all(s["options"]["nthreads"] == 1 for s in specs.values())
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert list(worker_specs(jobs=3, gpus=0)) == ["cpu-0", "cpu-1", "cpu-2"]
