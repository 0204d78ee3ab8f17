"""Issue #25, the promises kept at the edges: bad input gets ONE line on stderr naming the file or
option and exit code 2, with no traceback, no library warning before it, nothing half-written and
nothing changed on disk. Every probe is a row of ``CASES``: (id, setup, command, expected).

``setup(w)`` prepares files in the case's own folder ``w.tmp`` (the working folder while the command
runs) and may return paths the command refers to; the command is a list of words where ``{name}``
is filled in from ``w``. After setup the folder is snapshotted (names, sizes, modification times):
a refused command must leave it exactly as it was, lock files and half-made run folders included.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from covidlib.cli import main
from covidlib.paths import SAMPLE_DATA
from tests.conftest import write_png

T = "train --arch basic_cnn --preset smoke --data {D} --epochs 2 --input-size 32"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """20 + 20 real slices from the sample."""
    root = tmp_path_factory.mktemp("edges") / "D"
    for name in ("COVID", "non-COVID"):
        (root / name).mkdir(parents=True)
        for src in sorted((SAMPLE_DATA / name).iterdir())[:20]:
            shutil.copy(src, root / name / src.name)
    return root


@pytest.fixture(scope="module")
def runs(data) -> dict[str, Path]:
    """Two finished basic_cnn runs on the tiny data, on the splits of seeds 42 and 7 (seconds each)."""
    out = {}
    for name, seed in (("run", "42"), ("run7", "7")):
        out[name] = data.parent / name
        assert main([*T.format(D=data).split(), "--seed", seed, "--out", str(out[name])]) == 0
    return out


@dataclass
class W:
    """What a case may refer to: the tiny data ``D``, the finished runs, and its own folder."""

    tmp: Path
    D: Path
    runs: dict[str, Path]
    monkeypatch: pytest.MonkeyPatch
    stack: ExitStack
    paths: dict[str, Path] = field(default_factory=dict)

    def copy_run(self, name: str = "run") -> Path:
        dest = self.tmp / f"{name}-copy"
        shutil.copytree(self.runs[name], dest)
        return dest

    def copy_data(self, name: str = "D2") -> Path:
        dest = self.tmp / name
        shutil.copytree(self.D, dest)
        return dest


# --- setups ------------------------------------------------------------------------------------

def preset(text: bytes) -> Callable[[W], dict]:
    def make(w: W) -> dict:
        (w.tmp / "p.yaml").write_bytes(text)
        return {"P": w.tmp / "p.yaml"}
    return make


def predictions(edit: Callable[[pd.DataFrame], pd.DataFrame]) -> Callable[[W], dict]:
    def make(w: W) -> dict:
        run = w.copy_run()
        preds = pd.read_csv(run / "predictions.csv")
        edit(preds).to_csv(run / "predictions.csv", index=False)
        return {"R": run}
    return make


def set_cell(column: str, value) -> Callable[[pd.DataFrame], pd.DataFrame]:
    def edit(df: pd.DataFrame) -> pd.DataFrame:
        df[column] = df[column].astype(object)
        df.loc[0, column] = value
        return df
    return edit


def run_copy(w: W) -> dict:
    return {"R": w.copy_run()}


def other_data(w: W) -> dict:
    d2 = w.copy_data()
    write_png(d2 / "COVID" / "extra.png")
    return {"D2": d2, "R": w.copy_run()}


def other_split(w: W) -> dict:
    from covidlib.data.dataset import load_dataset
    from covidlib.data.splits import make_split

    return {"R": w.copy_run(), "S": make_split(load_dataset(w.D), "random", seed=7).save(w.tmp / "s7.csv")}


def nan_loss(w: W) -> dict:
    """A loss that turns NaN in the first epoch, as a diverging run's does."""
    from covidlib import runtime
    from covidlib.models import train as train_mod

    keras, real = runtime.keras(), train_mod.loss_and_target
    w.monkeypatch.setattr(train_mod, "loss_and_target",
                          lambda name: (lambda y, p: keras.ops.mean(p) * float("nan"), real(name)[1]))
    return {}


def writer_holds_out_and_alias(w: W) -> dict:
    """Another writer holds ``out``; ``alias`` is a symlink to it."""
    from covidlib.models.runs import RunFolder

    (w.tmp / "alias").symlink_to(w.tmp / "out")
    w.stack.enter_context(RunFolder(w.tmp / "out").writer())
    return {}


def foreign_folder(w: W) -> dict:
    (w.tmp / "mine").mkdir()
    (w.tmp / "mine" / "notes.txt").write_text("mine\n")
    return {"F": w.tmp / "mine"}


def same_image_in_both_classes(w: W) -> dict:
    d2 = w.copy_data()
    src = sorted((d2 / "COVID").iterdir())[0]
    shutil.copy(src, d2 / "non-COVID" / "copy.png")
    return {"D2": d2, "A": src, "B": d2 / "non-COVID" / "copy.png"}


def third_folder(w: W) -> dict:
    d2 = w.copy_data()
    write_png(d2 / "other" / "x.png")
    return {"D2": d2}


def bad_names(w: W) -> dict:
    d2 = w.copy_data()
    (d2 / "COVID" / "evil\n\x1b]0;owned\x07.png").write_bytes(b"not a png")
    return {"D2": d2}


def tiny_image(w: W) -> dict:
    return {"I": write_png(w.tmp / "tiny.png", size=(1, 1)), "R": w.runs["run"]}


def truncated_model(w: W) -> dict:
    run = w.copy_run()
    data = (run / "model.keras").read_bytes()
    (run / "model.keras").write_bytes(data[: len(data) // 2])
    return {"R": run, "I": next((w.D / "COVID").iterdir())}


def lambda_weights(w: W) -> dict:
    from covidlib import runtime

    keras = runtime.keras()
    inp = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(2, 3)(keras.layers.Lambda(lambda t: t * 2)(inp))
    keras.Model(inp, x).save(w.tmp / "lambda.keras")
    return {"L": w.tmp / "lambda.keras"}


def offline(w: W) -> dict:
    """No cached ImageNet weights, and every download refused at once (a closed local port as proxy)."""
    home = w.tmp.parent / f"{w.tmp.name}-keras"  # outside the snapshot: Keras writes its keras.json there
    home.mkdir()
    return {"K": home}


OFFLINE_ENV = {"KERAS_HOME": "{K}", "HTTPS_PROXY": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
               "HTTP_PROXY": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"}


def disk_full(w: W) -> dict:
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    w.monkeypatch.setattr(pd.DataFrame, "to_csv", full)
    return {}


# --- the table -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Expect:
    """Exit code and the words every stderr line must hold, one list per line (one line: an error)."""

    words: tuple[str, ...] = ()
    code: int = 2
    lines: tuple[tuple[str, ...], ...] | None = None  # for exit 0: each expected stderr line's words
    process: bool = False  # a fresh process: Python warnings and stdout as a user sees them
    env: dict = field(default_factory=dict)
    stdout_empty: bool = False


def E(*words: str, **kw) -> Expect:
    return Expect(words=words, **kw)


SEED_RANGE = "must be between 0 and 2147483647"
CASES = [
    # 1. non-finite numbers
    ("dropout-nan", None, f"{T} --dropout nan --out out", E("--dropout must be a finite number, got nan")),
    ("learning-rate-nan", None, f"{T} --learning-rate nan --out out", E("--learning-rate must be a finite number")),
    ("preset-dropout-nan", preset(b"defaults: {dropout: .nan}\n"),
     "train --arch basic_cnn --preset {P} --data {D} --out out", E("--dropout must be a finite number", "(preset ")),
    ("loss-turns-nan", nan_loss, f"{T} --out out", E("training stopped at epoch 1", "loss became nan")),
    # 2. a preset that is not UTF-8
    ("preset-not-utf8", preset(b"\xff\xfe"), "train --arch basic_cnn --preset {P} --data {D} --out out",
     E("preset file", "p.yaml is not UTF-8 text")),
    # 3. seeds out of range, one validator for every --seed
    ("split-seed-negative", None, "data split --data {D} --seed -5 --out out", E(f"--seed: {SEED_RANGE}, got -5")),
    ("split-seed-huge", None, "data split --data {D} --seed 1099511627776 --out out",
     E(f"--seed: {SEED_RANGE}, got 1099511627776")),
    ("split-seed-text", None, "data split --data {D} --seed one --out out", E("--seed: must be a whole number")),
    ("baselines-seed-negative", None, "baselines --data {D} --seed -1", E(f"--seed: {SEED_RANGE}, got -1")),
    ("train-backbone-seed-negative", None, f"{T} --backbone-seed -1 --out out", E(f"--backbone-seed: {SEED_RANGE}")),
    ("study-seed-negative", None, "study --data {D} --archs basic_cnn --seed -1 --no-book",
     E(f"--seed: {SEED_RANGE}, got -1")),
    ("study-last-seed-out-of-range", None, "study --data {D} --archs basic_cnn --seed 2147483647 --seeds 2 --no-book",
     E("--seed must be between 0 and 2147483646 with --seeds 2")),
    # 4 and 8. predictions.csv checked
    ("predictions-nan", predictions(set_cell("p_covid", "nan")), "evaluate --run {R} --resamples 100",
     E("predictions.csv: row 2 has p_covid", "not a probability")),
    ("predictions-p-7.5", predictions(set_cell("p_covid", 7.5)), "evaluate --run {R} --resamples 100",
     E("predictions.csv: row 2 has p_covid = 7.5")),
    ("predictions-label-3", predictions(set_cell("y", 3)), "evaluate --run {R} --resamples 100",
     E("predictions.csv: row 2 has label y = 3, not 0 or 1")),
    ("predictions-header-only", predictions(lambda df: df.iloc[:0]), "evaluate --run {R} --resamples 100",
     E("predictions.csv: holds no predictions")),
    # 5. --input-size 0 is not "the paper's size"
    ("input-size-0", None, f"{T} --input-size 0 --out out", E("--input-size must be between 16 and 1024, got 0")),
    ("preset-input-size-0", preset(b"defaults: {input_size: 0}\n"),
     "train --arch basic_cnn --preset {P} --data {D} --out out", E("--input-size must be between 16 and 1024, got 0")),
    # 6 and 7. a resume is the same run, finished or not
    ("resume-finished-other-lr", run_copy, f"{T} --out {{R}} --resume --learning-rate 0.01",
     E("was started with learning_rate = 0.0003, not 0.01")),
    ("resume-finished-other-arch", run_copy, f"{T} --out {{R}} --resume".replace("basic_cnn", "alexnet"),
     E("was started with arch = 'basic_cnn', not 'alexnet'")),
    ("resume-finished-other-data", other_data, f"{T} --out {{R}} --resume".replace("{D}", "{D2}"),
     E("was started on another data")),
    ("resume-other-split", other_split, f"{T} --out {{R}} --resume --split {{S}}",
     E("was started on another split than --split", "s7.csv")),
    # 9. one writer per folder, whatever the path it is named by
    ("lock-through-symlink", writer_holds_out_and_alias, f"{T} --out alias --resume",
     E("alias is being written by another process")),
    # 10. a study writes into a study folder only
    ("study-out-run-folder", run_copy, "study --data {D} --archs basic_cnn --no-book --out {R}",
     E("run-copy is not empty and not a study folder")),
    ("study-out-foreign-folder", foreign_folder, "study --data {D} --archs basic_cnn --no-book --out {F}",
     E("mine is not empty and not a study folder")),
    # 12. data and presets that say nothing
    ("same-image-in-both-classes", same_image_in_both_classes, "data info --data {D2}",
     E("are the same image (byte-identical) in both class folders", "COVID/", "non-COVID/copy.png")),
    ("third-class-folder-warns", third_folder, "data info --data {D2}",
     Expect(code=0, lines=(("covidlib: warning:", "D2: ignored other (not a COVID or non-COVID class folder)"),))),
    ("empty-preset", preset(b""), "train --arch basic_cnn --preset {P} --data {D} --out out", E("p.yaml is empty")),
    # 13. explain refuses what the dataset would
    ("explain-1x1-image", tiny_image, "explain --run {R} --image {I} --method gradcam --out out.png",
     E("tiny.png: image is 1x1, smaller than 16 px a side")),
    # 14. a failed train leaves no lock file (the snapshot check): a split naming images not in the data
    ("failed-train-leaves-no-lock", preset(b"path,label,split\nCOVID/none.png,COVID,test\n"),
     f"{T} --split {{P}} --out out", E("names 1 images not in")),
    # 15. file names printed escaped
    ("skip-bad-names-escaped", bad_names, "data info --data {D2} --skip-bad",
     Expect(code=0, lines=(("covidlib: skipped 1 unusable file", "evil\\n\\x1b]0;owned\\x07.png"),))),
    # 16. no library noise before the line
    ("weights-imagenet-offline", offline, f"{T} --out out --weights imagenet".replace("basic_cnn", "mobilenet"),
     E("cannot download ImageNet weights for mobilenet", process=True, env=OFFLINE_ENV, stdout_empty=True)),
    ("weights-lambda-model", lambda_weights, f"{T} --out out --weights {{L}}".replace("basic_cnn", "mobilenet"),
     E("--weights", "lambda.keras: cannot load into mobilenet", process=True, stdout_empty=True)),
    ("kfold-says-nothing-but-its-files", None, "data split --data {D} --kfold 3 --out folds",
     Expect(code=0, lines=(), process=True)),
    ("kfold-with-groups", None, "data split --data {D} --kfold 3 --groups 10 --out folds",
     E("--groups makes one split of Ward clusters; --kfold does not use it")),
    # 17. messages that name the file
    ("weights-missing-file", None, f"{T} --weights nope.h5 --out out", E("--weights nope.h5: no such file")),
    ("truncated-model", truncated_model, "explain --run {R} --image {I} --method gradcam --out out.png",
     E("model.keras cannot be loaded: it is damaged or truncated")),
    ("disk-full-names-the-file", disk_full, "data info --data {D} --manifest m.csv",
     E("m.csv: cannot write it (No space left on device)")),
    ("compare-refuses-before-printing", None, "compare {run} {run7} --resamples 100 --out cmp",
     E("were tested on different images", stdout_empty=True)),
]


def _snapshot(root: Path) -> dict[str, tuple]:
    return {str(p.relative_to(root)): (p.is_dir(), p.lstat().st_size if not p.is_dir() else 0, p.lstat().st_mtime_ns)
            for p in root.rglob("*")}


def _run(argv: list[str], expect: Expect, env: dict, capfd) -> tuple[int, str, str]:
    if expect.process:
        done = subprocess.run([sys.executable, "-m", "covidlib.cli", *argv], capture_output=True, text=True,
                              timeout=600, env={**os.environ, **env})
        return done.returncode, done.stdout, done.stderr
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    out, err = capfd.readouterr()
    return code, out, err


@pytest.mark.parametrize("setup, command, expect", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_an_edge_is_one_line_and_leaves_nothing(setup, command, expect, tmp_path, data, runs, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    with ExitStack() as stack:
        w = W(tmp_path, data, runs, monkeypatch, stack)
        w.paths.update({"tmp": tmp_path, "D": data, **runs})
        if setup is not None:
            w.paths.update(setup(w) or {})
        argv = [word.format(**w.paths) for word in command.split()]
        env = {k: v.format(**w.paths) for k, v in expect.env.items()}
        capfd.readouterr()
        before = _snapshot(tmp_path)
        code, out, err = _run(argv, expect, env, capfd)
        lines = err.splitlines()
        assert code == expect.code, err[-3000:]
        if expect.code == 2:
            assert len(lines) == 1 and lines[0].startswith("covidlib: error: "), err[-3000:]
            assert all(word in lines[0] for word in expect.words), lines[0]
            assert _snapshot(tmp_path) == before  # nothing written, removed or touched
        else:
            assert len(lines) == len(expect.lines), err[-3000:]
            for line, words in zip(lines, expect.lines):
                assert all(word in line for word in words), line
        assert "\x1b" not in out + err and "Traceback" not in err
        if expect.stdout_empty:
            assert out == "", out[-2000:]


def test_the_skipped_line_of_data_info_is_escaped_too(tmp_path, data, capsys):
    d2 = shutil.copytree(data, tmp_path / "D2")
    (d2 / "COVID" / "evil\n\x1b[31m.png").write_bytes(b"not a png")
    assert main(["data", "info", "--data", str(d2), "--skip-bad"]) == 0
    out = capsys.readouterr().out
    skipped = [line for line in out.splitlines() if line.startswith("skipped")]
    assert len(skipped) == 1 and skipped[0].startswith("skipped      COVID/evil\\n\\x1b[31m.png: ")
    assert "\x1b" not in out


def test_outcomes_written_from_threads_side_by_side_are_all_kept(tmp_path):
    """Report notebooks finish in two threads; an unguarded read-change-write of status.json loses one."""
    from concurrent.futures import ThreadPoolExecutor

    from covidlib.study.folder import StudyFolder

    study = StudyFolder(tmp_path / "study")
    study.path.mkdir()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: study.set_status(f"notebook:{i}", status="done", seconds=i), range(200)))
    assert study.status() == {f"notebook:{i}": {"status": "done", "seconds": i} for i in range(200)}


def test_a_rerun_replaces_a_stale_error_in_status_json(tmp_path):
    """Item 11 (fixed on main): a new outcome replaces every field of the old one."""
    from covidlib.study.folder import StudyFolder

    study = StudyFolder(tmp_path)
    study.set_status("basic_cnn-random", status="failed", error="out of memory", seconds=3.0)
    study.set_status("basic_cnn-random", status="done", seconds=12.5)
    assert json.loads(study.status_file.read_text()) == {"basic_cnn-random": {"status": "done", "seconds": 12.5}}
    assert study.failures() == []


def test_image_grid_captions_are_text_not_html():
    from covidlib.plots import image_grid

    fig = image_grid([np.zeros((4, 4), np.uint8)], ["<img src=x onerror=alert(1)>.png"], cols=1)
    assert fig.layout.annotations[0].text == "&lt;img src=x onerror=alert(1)&gt;.png"


def test_a_waiter_on_a_removed_lock_file_takes_the_new_one(tmp_path):
    """The writer removes its lock file as it ends; a second writer that opened the old file first must
    not lock that orphan (which a third writer could never see) but the file on disk."""
    import fcntl

    from covidlib.models.runs import RunFolder

    run = RunFolder(tmp_path / "run")
    stale = open(run.lock_file, "a+")  # opened before the first writer removes it
    with run.writer():
        pass
    assert not run.lock_file.exists()
    fcntl.flock(stale, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the orphan is free: taking it must not count
    with run.writer():
        assert run.lock_file.exists()
        with pytest.raises(Exception, match="being written by another process"):
            with RunFolder(tmp_path / "run").writer():
                pass
    stale.close()
    assert not run.lock_file.exists()


@pytest.mark.slow
@pytest.mark.parametrize("extra", ["study"])
def test_each_extra_installs_alone_with_what_it_needs(extra, tmp_path):
    """`pip install -e ".[study]"` then the notebooks: pandas' .style needs jinja2 (a fresh venv, online)."""
    import socket
    import venv

    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
    except OSError:
        pytest.skip("no network to install from")
    venv.create(tmp_path / "venv", with_pip=True)
    py = tmp_path / "venv" / "bin" / "python"
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([py, "-m", "pip", "install", "-q", "-c", root / "constraints.txt", f"{root}[{extra}]"],
                          capture_output=True, text=True, timeout=3000)
    if done.returncode != 0 and "Could not" in done.stderr:
        pytest.skip(f"pip could not reach the index: {done.stderr.splitlines()[-1]}")
    assert done.returncode == 0, done.stderr[-3000:]
    check = "import pandas as pd, papermill, ipykernel; pd.DataFrame({'a': [1]}).style.to_html()"
    assert subprocess.run([py, "-c", check], capture_output=True, text=True, timeout=600).returncode == 0
