"""``covidlib study``: papermill over the notebooks for every architecture, then the book.

A study folder holds the shared split files, one run folder per (architecture, split)
and the executed notebooks. One failing architecture is recorded in ``status.json``
and the others go on; a rerun skips what finished unless ``force``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from covidlib import CovidlibError
from covidlib.config import load_preset, preset_archs, study_settings
from covidlib.data import load_dataset
from covidlib.executors import make_executor
from covidlib.models import ARCHITECTURES
from covidlib.paths import data_dir, project_dir, write_text_atomic
from covidlib.runs import RunFolder
from covidlib.splits import SPLIT_KINDS, make_split

REPORT_NOTEBOOKS = ("dataset", "comparison", "validity", "explainability")


# Set in the kernels a study starts: the notebooks then render for the offline book
# (plotly.js embedded), not for whatever front end a person would use (see notebook.setup).
BOOK_ENV = "COVIDLIB_BOOK"
QUICK_ARCHS = ("basic_cnn", "mobilenet")
# Runs of extra seeds are named ARCH-SPLIT-seedN; the main run (the study's seed) keeps ARCH-SPLIT.
SEED_SUFFIX = "-seed"


def notebook_dir() -> Path:
    """The notebooks: the clone's ``notebooks/``, else the copy inside the installed wheel."""
    return project_dir() / "notebooks"


def copy_notebooks(dest: str | Path, force: bool = False) -> list[Path]:
    """Copy the five notebooks into ``dest`` (for JupyterLab users without a clone)."""
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise CovidlibError(f"{dest} is a file, not a folder")
    sources = sorted(notebook_dir().glob("*.ipynb"))
    clash = [dest / s.name for s in sources if (dest / s.name).exists()]
    if clash and not force:
        raise CovidlibError(f"{clash[0]} already exists; pass --force to overwrite the notebooks in {dest}")
    dest.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(s, dest / s.name)) for s in sources]


def read_status(study: str | Path) -> dict:
    """``status.json``: each run's and report notebook's outcome and seconds ({} before the first)."""
    path = Path(study) / "status.json"
    return json.loads(path.read_text()) if path.exists() else {}


def failures(study: str | Path) -> list[str]:
    """The runs and notebooks that failed in a study."""
    return [k for k, v in read_status(study).items() if v.get("status") == "failed"]


class _Status:
    def __init__(self, path: Path):
        self.path = path
        self.data: dict = read_status(path.parent)

    def set(self, key: str, **fields) -> None:
        self.data[key] = {**self.data.get(key, {}), **fields}
        write_text_atomic(self.path, json.dumps(self.data, indent=2))


@contextmanager
def _kernels_render_for_the_book():
    """The kernels papermill starts inherit this process's environment; set the flag only meanwhile."""
    before = os.environ.get(BOOK_ENV)
    os.environ[BOOK_ENV] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ[BOOK_ENV]
        else:
            os.environ[BOOK_ENV] = before


def _execute(notebook: Path, out: Path, parameters: dict, cwd: Path, timeout: int) -> None:
    try:
        import papermill as pm
    except ImportError:
        raise CovidlibError('covidlib study runs the notebooks with papermill: pip install "covidlib[study]"') from None

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}")
    try:
        pm.execute_notebook(str(notebook), str(tmp), parameters=parameters, kernel_name="python3",
                            progress_bar=False, cwd=str(cwd), execution_timeout=timeout,
                            # ipykernel>=7 warns on stderr at every start that its local TCP is unencrypted, and
                            # jupyter_client interrupts a kernel before shutting it down, which an idle kernel
                            # logs as an ERROR line; a cell's own error reaches papermill through the protocol
                            extra_arguments=["--IPKernelApp.log_level=CRITICAL"])
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)


def prepare_splits(study: Path, dataset, splits, seed: int, force: bool = False, val_seeds=()) -> dict[str, str]:
    """One split file per kind, shared by every run of the study; and for each of ``val_seeds`` (the extra
    training seeds) a random split with the same test slices and its validation slices drawn with that seed.

    A split file already in the study is kept only if it was made from this dataset
    (manifest hash), with these seeds and kind; otherwise ``force`` remakes it, and without
    ``force`` the study is refused (its finished runs were trained on the old split).
    """
    wanted = {kind: (kind, seed) for kind in splits}
    wanted.update({f"random{SEED_SUFFIX}{s}": ("random", s) for s in val_seeds})
    files = {}
    for name, (kind, val_seed) in wanted.items():
        path = study / f"split-{name}.csv"
        if path.exists() and not _split_matches(path, dataset, kind, seed, val_seed):
            if not force:
                raise CovidlibError(f"{path} was made from other data or with another seed than this study's "
                                    f"({dataset.root}, seed {seed}); pass --force to remake the study, or use another --out")
            path.unlink()
        if not path.exists():
            make_split(dataset, kind, seed=seed, val_seed=val_seed).save(path)
        files[name] = str(path)
    return files


def _split_matches(path: Path, dataset, kind: str, seed: int, val_seed: int) -> bool:
    try:
        info = json.loads(path.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return False
    return ((info.get("manifest_hash"), info.get("kind"), info.get("seed"), info.get("val_seed", info.get("seed")))
            == (dataset.manifest_hash, kind, seed, val_seed))


def quick_study(out: str | Path, preset: str = "smoke", data: str | None = None, archs=QUICK_ARCHS,
                splits=SPLIT_KINDS, seed: int = 42) -> Path:
    """A small study trained in this process (no papermill, no book), for a report notebook opened alone."""
    from covidlib.config import resolve
    from covidlib.train import train

    study = Path(out).resolve()
    root = Path(data_dir(data)).resolve()
    split_files = prepare_splits(study, load_dataset(root), splits, seed)
    status = _Status(study / "status.json")
    for kind in splits:
        for arch in archs:
            key = f"{arch}-{kind}"
            print(f"  {key}: training ({arch} on the {kind} split, preset {preset})", flush=True)
            t0 = time.perf_counter()
            config = resolve(arch, preset, data=str(root), split=split_files[kind], seed=seed)
            train(config, resume=True, run_dir=study / "runs" / key)
            status.set(key, status="done", seconds=round(time.perf_counter() - t0, 1))
    return study


@dataclass(frozen=True)
class TrainingRun:
    """One papermill execution of the training notebook: what an executor runs, here or on a worker."""

    key: str
    label: str  # "mobilenet on the grouped split"
    params: dict
    notebook: str
    executed: str
    cwd: str
    timeout: int

    def __call__(self) -> float:
        os.environ[BOOK_ENV] = "1"  # the kernel inherits it: render for the offline book
        RunFolder(Path(self.params["run_dir"])).wait_for_writer()  # a lost worker's kernel may still be exiting
        print(f"  {self.key}: training ({self.label})", flush=True)  # a worker's log, under Dask
        t0 = time.perf_counter()
        _execute(Path(self.notebook), Path(self.executed), self.params, Path(self.cwd), self.timeout)
        return time.perf_counter() - t0


def _run_training(run: TrainingRun) -> float:
    return run()


def run_study(preset: str = "smoke", *, archs: list[str] | None = None, data: str | None = None,
              out: str | Path | None = None, jobs: int | None = None, force: bool = False, splits=SPLIT_KINDS,
              seed: int = 42, book: bool = True, reports: bool = True, cell_timeout: int = 4 * 3600,
              external: str | Path | None = None, executor: str = "local", scheduler: str | None = None,
              seeds: int | None = None, sweep_cnn: bool = False) -> Path:
    """Train every architecture through the training notebook, then the report notebooks and the book.

    ``jobs`` and ``seeds`` default to the preset's ``study:`` settings (1 where it has none).
    ``cell_timeout`` turns a hung notebook cell into a recorded failure instead of a wait forever.
    ``executor="dask"`` runs the training notebooks on a Dask cluster (``scheduler``'s, or a local
    one); the report notebooks and the book always run here. ``seeds`` > 1 trains every model on the
    random split (the paper's protocol, Table 1) with that many seeds, ``seed``, ``seed + 1``, ...:
    the test slices stay the same, the validation slices are drawn again (one split file per seed),
    and initialisation, shuffling, dropout and augmentation change. A random frozen backbone stays the
    one drawn with ``seed`` (``backbone_seed``), so its cached features serve every training seed.
    ``sweep_cnn`` has the validity notebook also train the Basic CNN on every level of its coarseness
    sweep (off by default: on the cpu preset it adds about 2 minutes a level on 2 cores).
    """
    settings = study_settings(preset)  # the preset's seeds and jobs, unless given here
    jobs = settings["jobs"] if jobs is None else jobs
    seeds = settings["seeds"] if seeds is None else seeds
    archs = _checked(preset, archs, splits, jobs, executor, scheduler, seeds)
    root = Path(data_dir(data)).resolve()
    dataset = load_dataset(root)
    if external and load_dataset(external).manifest_hash == dataset.manifest_hash:
        raise CovidlibError(f"--external {external} is the study's own dataset; an external test must be other data")
    study = Path(out or Path("studies") / Path(preset).stem).resolve()
    created = not study.exists()
    (study / "runs").mkdir(parents=True, exist_ok=True)
    try:  # a cluster that does not answer, or cannot see the study, stops it before anything is written
        pool = make_executor(executor, jobs=jobs, scheduler=scheduler, shared=[study, root])
    except BaseException:
        if created:
            shutil.rmtree(study, ignore_errors=True)
        raise
    status = _Status(study / "status.json")
    if force:
        shutil.rmtree(study / "runs", ignore_errors=True)
        status.data = {}
    t_start = time.perf_counter()
    try:
        extra = [seed + i for i in range(1, seeds)] if "random" in splits else []
        split_files = prepare_splits(study, dataset, splits, seed, force=force, val_seeds=extra)
        print(f"study {study}: {len(_runs_of(splits, archs, seed, seeds))} training runs ({', '.join(archs)}) on {root} "
              f"[{len(dataset.manifest)} images], preset {preset}", flush=True)
        todo = []
        for kind, arch, run_seed in _runs_of(splits, archs, seed, seeds):
            suffix = f"{SEED_SUFFIX}{run_seed}" if run_seed != seed else ""
            key = f"{arch}-{kind}{suffix}"
            params = {"arch": arch, "preset": str(preset), "data": str(root), "split": split_files[kind + suffix],
                      "run_dir": str(study / "runs" / key), "seed": run_seed, "backbone_seed": seed}
            executed = study / "notebooks" / f"train_{key}.ipynb"
            if RunFolder(study / "runs" / key).finished and executed.exists():
                status.set(key, status="done", skipped=True)
                print(f"  {key} finished earlier (skipped)", flush=True)
                continue
            todo.append(TrainingRun(key, f"{arch} on the {kind} split, seed {run_seed}", params,
                                    str(notebook_dir() / "train.ipynb"), str(executed), str(study), cell_timeout))
        with _kernels_render_for_the_book():
            _train_all(todo, pool, status)
    finally:
        pool.close()
    if reports:
        _run_reports(study, root, external, status, cell_timeout, sweep_cnn)
    failed = failures(study)
    print(f"study finished in {time.perf_counter() - t_start:.0f} s; "
          + (f"failed: {', '.join(failed)}" if failed else "all runs and notebooks succeeded"), flush=True)
    if book:
        from covidlib.book import build_book

        index = build_book(study)
        print(f"book: {index}", flush=True)
    return study


def _runs_of(splits, archs, seed: int, seeds: int) -> list[tuple[str, str, int]]:
    """(split, arch, seed) of every run: ``seeds`` seeds on the random split, the study's seed elsewhere."""
    return [(kind, arch, seed + i) for kind in splits for i in range(seeds if kind == "random" else 1)
            for arch in archs]


def _checked(preset: str, archs, splits, jobs: int, executor: str, scheduler: str | None, seeds: int) -> list[str]:
    """The study's arguments, refused with one line before anything runs; returns the architectures."""
    from covidlib.executors import EXECUTORS

    load_preset(preset)
    archs = archs or preset_archs(preset)
    for arch in archs:
        if arch not in ARCHITECTURES:
            raise CovidlibError(f"unknown architecture {arch!r}; valid: {', '.join(ARCHITECTURES)}")
    for kind in splits:
        if kind not in SPLIT_KINDS:
            raise CovidlibError(f"unknown split kind {kind!r}; valid: {', '.join(SPLIT_KINDS)}")
    if jobs < 1:
        raise CovidlibError(f"--jobs must be at least 1, got {jobs}")
    if not 1 <= seeds <= 20:
        raise CovidlibError(f"--seeds must be between 1 and 20, got {seeds}")
    if executor not in EXECUTORS:
        raise CovidlibError(f"--executor must be one of {', '.join(EXECUTORS)}, not {executor!r}")
    if scheduler and executor != "dask":
        raise CovidlibError("--scheduler needs --executor dask")
    return archs


def _run_reports(study: Path, root: Path, external, status: _Status, cell_timeout: int, sweep_cnn: bool) -> None:
    """The report notebooks, here, once every run they read has finished."""
    for name in REPORT_NOTEBOOKS:
        t0 = time.perf_counter()
        try:
            with _kernels_render_for_the_book():
                params = {"study_dir": str(study), "data": str(root)}
                if name == "validity":
                    params.update({"sweep_cnn": sweep_cnn, **({"external": str(Path(external).resolve())}
                                                              if external else {})})
                _execute(notebook_dir() / f"{name}.ipynb", study / "notebooks" / f"{name}.ipynb", params, study,
                         cell_timeout)
            status.set(f"notebook:{name}", status="done", seconds=round(time.perf_counter() - t0, 1))
        except Exception as exc:
            status.set(f"notebook:{name}", status="failed", error=str(exc).strip().splitlines()[-1][:300])
            print(f"  notebook {name}: FAILED", file=sys.stderr, flush=True)


def _train_all(runs: list[TrainingRun], executor, status: _Status) -> None:
    """Every run through ``executor``; each outcome recorded and printed as it comes."""
    t_start, durations = time.perf_counter(), []
    for run in runs:
        status.set(run.key, status="running")
    if not runs:
        return
    for done, (run, outcome) in enumerate(executor.run(_run_training, runs), start=1):
        if isinstance(outcome, BaseException):
            lines = str(outcome).strip().splitlines()
            reason = next((ln for ln in reversed(lines) if ln.strip()), type(outcome).__name__)[:300]
            status.set(run.key, status="failed", error=reason)
            print(f"  {run.key}: FAILED ({reason})", file=sys.stderr, flush=True)
            line = f"{run.key} FAILED"
        else:
            status.set(run.key, status="done", seconds=round(outcome, 1))
            durations.append(outcome)
            line = f"{run.key} done in {outcome:.0f} s"
        left = len(runs) - done
        jobs = getattr(executor, "jobs", 1)
        eta = sum(durations) / len(durations) * left / jobs if durations else float("nan")
        print(f"[{done}/{len(runs)}] {line}; {time.perf_counter() - t_start:.0f} s elapsed"
              + (f", about {eta / 60:.0f} min left" if left and durations else ""), flush=True)

