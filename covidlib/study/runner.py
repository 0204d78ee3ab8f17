"""``covidlib study``: papermill over the training notebook for every architecture, then the
report notebooks, then the book.

One failing architecture is recorded in ``status.json`` and the others go on; a rerun skips
what finished unless ``force``. The folder's layout and run names belong to :class:`StudyFolder`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from covidlib import CovidlibError
from covidlib.data.dataset import Dataset, load_dataset
from covidlib.data.splits import load_split, make_split
from covidlib.evaluate.folds import fold_run_name, save_scan_folds, serves_fold
from covidlib.evaluate.masking import MASKED_VIEWS, masked_run_dir
from covidlib.models.architectures import ARCHITECTURES
from covidlib.models.config import Preset, resolve
from covidlib.models.runs import RunFolder
from covidlib.models.train import split_used, train
from covidlib.paths import data_dir
from covidlib.study import notebooks
from covidlib.study.book import build_book
from covidlib.study.executors import EXECUTORS, make_executor
from covidlib.study.folder import EXPERIMENTS, RunName, StudyFolder
from covidlib.vocabulary import DEFAULT_SEED, SEED_RANGE, SPLIT_KINDS

REPORT_NOTEBOOKS = ("dataset", "comparison", "validity", "explainability")
QUICK_ARCHS = ("basic_cnn", "mobilenet")


def prepare_splits(study: StudyFolder, dataset: Dataset, splits, seed: int, force: bool = False,
                   val_seeds=()) -> dict[tuple[str, int | None], str]:
    """One split file per kind, shared by every run of the study; and for each of ``val_seeds`` (the extra
    training seeds) a random split with the same test slices and its validation slices drawn with that seed.
    Keyed by (kind, extra seed), the extra seed None for the study's own split of a kind.

    A split file already in the study is kept only if it was made from this dataset
    (manifest hash), with these seeds and kind; otherwise ``force`` remakes it, and without
    ``force`` the study is refused (its finished runs were trained on the old split).
    """
    wanted = {(kind, None): seed for kind in splits}
    wanted.update({("random", s): s for s in val_seeds})
    files = {}
    for (kind, extra), val_seed in wanted.items():
        path = study.split_file(kind, extra)
        if path.exists() and not _split_matches(path, dataset, kind, seed, val_seed):
            if not force:
                raise CovidlibError(f"{path} was made from other data or with another seed than this study's "
                                    f"({dataset.root}, seed {seed}); pass --force to remake the study, or use another --out")
            path.unlink()
        if not path.exists():
            make_split(dataset, kind, seed=seed, val_seed=val_seed).save(path)
        files[kind, extra] = str(path)
    return files


def _split_matches(path: Path, dataset: Dataset, kind: str, seed: int, val_seed: int) -> bool:
    try:
        info = json.loads(path.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return False
    return ((info.get("manifest_hash"), info.get("kind"), info.get("seed"), info.get("val_seed", info.get("seed")))
            == (dataset.manifest_hash, kind, seed, val_seed))


def quick_study(out: str | Path, preset: str = "smoke", data: str | None = None, archs=QUICK_ARCHS,
                splits=SPLIT_KINDS, seed: int = DEFAULT_SEED) -> Path:
    """A small study trained in this process (no papermill, no book), for a report notebook opened alone."""
    study = StudyFolder(Path(out).resolve())
    study.refuse_foreign()
    root = Path(data_dir(data)).resolve()
    split_files = prepare_splits(study, load_dataset(root), splits, seed)
    for kind in splits:
        for arch in archs:
            name = RunName(arch, kind)
            print(f"  {name}: training ({arch} on the {kind} split, preset {preset})", flush=True)
            t0 = time.perf_counter()
            config = resolve(arch, preset, data=str(root), split=split_files[kind, None], seed=seed)
            train(config, resume=True, run_dir=study.run(name).path)
            study.set_status(str(name), status="done", seconds=round(time.perf_counter() - t0, 1))
    return study.path


@dataclass(frozen=True)
class TrainingRun:
    """One papermill execution of the training notebook: what an executor runs, here or on a worker."""

    key: str
    label: str  # "mobilenet on the scan split"
    params: dict
    notebook: str
    executed: str
    cwd: str
    timeout: int

    def __call__(self) -> float:
        os.environ[notebooks.BOOK_ENV] = "1"  # the kernel inherits it: render for the offline book
        RunFolder(Path(self.params["run_dir"])).wait_for_writer()  # a lost worker's kernel may still be exiting
        print(f"  {self.key}: training ({self.label})", flush=True)  # a worker's log, under Dask
        t0 = time.perf_counter()
        notebooks.run_notebook(Path(self.notebook), Path(self.executed), self.params, Path(self.cwd), self.timeout)
        return time.perf_counter() - t0


@dataclass(frozen=True)
class RetrainingRun:
    """One retraining of the Basic CNN that the validity notebook asks for (a scan fold, a lung-masked
    view), run ahead in the training pool through ``covidlib train`` so that it overlaps the training
    notebooks; the notebook then finds the run finished and only reads it. Same settings as the
    notebook would use, so the run's identity matches (a mismatch is refused when the notebook resumes)."""

    key: str
    label: str
    args: tuple[str, ...]
    log: str

    def __call__(self) -> float:
        print(f"  {self.key}: training ({self.label})", flush=True)
        t0 = time.perf_counter()
        Path(self.log).parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "w") as log:
            done = subprocess.run([sys.executable, "-m", "covidlib.cli", "train", *self.args], stdout=log,
                                  stderr=subprocess.STDOUT, check=False)
        if done.returncode:
            lines = Path(self.log).read_text().strip().splitlines()
            raise CovidlibError(lines[-1] if lines else f"covidlib train exited with {done.returncode}")
        return time.perf_counter() - t0


def _run_training(run: TrainingRun | RetrainingRun) -> float:
    return run()


def _retraining_runs(what: StudyPlan, study: StudyFolder, dataset: Dataset, split_files: dict) -> list[RetrainingRun]:
    """The validity notebook's Basic CNN retrainings not finished yet: each scan fold and each
    lung-masked view of each split (none when the study does not train the Basic CNN)."""
    if "basic_cnn" not in what.archs:
        return []
    planned = []
    if what.scan_folds and "scan" in what.splits:
        cv = study.experiment_dir("scan-cv")
        template = resolve("basic_cnn", str(what.preset), data=str(dataset.root), split=split_files["scan", None],
                           seed=what.seed)
        trained_on = split_used(load_split(template.split), template)  # what basic_cnn-scan trains on
        for fold, (split, path) in enumerate(save_scan_folds(dataset, what.scan_folds, cv, what.seed)):
            if serves_fold(template, trained_on, split):  # the validity notebook reads basic_cnn-scan there
                continue
            name = fold_run_name("basic_cnn", fold, what.scan_folds)
            planned.append((f"scan-cv:{name}", f"basic_cnn on scan fold {fold + 1} of {what.scan_folds}", path, None,
                            cv / "runs" / name))
    for kind in what.splits:
        for view in MASKED_VIEWS:
            run_dir = masked_run_dir(study.experiment_dir("lung-masked"), "basic_cnn", kind, view)
            planned.append((f"lung-masked:{run_dir.name}", f"basic_cnn on the {kind} split, {view}",
                            split_files[kind, None], view, run_dir))
    base = ("--arch", "basic_cnn", "--preset", str(what.preset), "--data", str(dataset.root), "--seed", str(what.seed),
            "--backbone-seed", str(what.seed), "--resume")
    runs = []
    for key, label, split, view, run_dir in planned:
        if RunFolder(run_dir).finished:
            study.set_status(key, status="done", skipped=True, seconds=study.status().get(key, {}).get("seconds"))
            continue
        args = (*base, "--split", str(split), "--out", str(run_dir), *(("--lungs", view) if view else ()))
        runs.append(RetrainingRun(key, label, args, str(run_dir.parent / f"{run_dir.name}.log")))
    return runs


@dataclass(frozen=True)
class StudyPlan:
    """What ``covidlib study`` was asked, checked before anything is written."""

    preset: str
    archs: list[str]
    splits: tuple[str, ...]
    seed: int
    seeds: int
    jobs: int
    executor: str
    scheduler: str | None
    scan_folds: int = 0  # the validity notebook's cross-validation over scans (the preset's study setting)
    sanity_slices: int = 20  # the explainability notebook's slices per class and model (the preset's)

    def runs(self) -> list[RunName]:
        """Every run: ``seeds`` seeds on the random split (the main seed's run unnumbered), one elsewhere."""
        return [RunName(arch, kind, self.seed + i if i else None) for kind in self.splits
                for i in range(self.seeds if kind == "random" else 1) for arch in self.archs]

    def extra_seeds(self) -> list[int]:
        return [self.seed + i for i in range(1, self.seeds)] if "random" in self.splits else []


def plan(preset: str, archs, splits, seed: int, seeds: int | None, jobs: int | None, executor: str,
         scheduler: str | None) -> StudyPlan:
    """The study's arguments, refused with one line before anything runs; ``jobs`` and ``seeds``
    default to the preset's ``study:`` settings (1 where it has none)."""
    spec = Preset.load(preset)
    jobs = spec.study["jobs"] if jobs is None else jobs
    seeds = spec.study["seeds"] if seeds is None else seeds
    archs = list(archs or spec.archs)
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
    if not SEED_RANGE[0] <= seed <= SEED_RANGE[1] - (seeds - 1):  # every run's seed, seed + seeds - 1 the last
        raise CovidlibError(f"--seed must be between {SEED_RANGE[0]} and {SEED_RANGE[1] - (seeds - 1)} "
                            f"with --seeds {seeds}, got {seed}")
    if executor not in EXECUTORS:
        raise CovidlibError(f"--executor must be one of {', '.join(EXECUTORS)}, not {executor!r}")
    if scheduler and executor != "dask":
        raise CovidlibError("--scheduler needs --executor dask")
    return StudyPlan(preset, archs, tuple(splits), seed, seeds, jobs, executor, scheduler, spec.study["scan_folds"],
                     spec.study["sanity_slices"])


def run_study(preset: str = "smoke", *, archs: list[str] | None = None, data: str | None = None,
              out: str | Path | None = None, jobs: int | None = None, force: bool = False, splits=SPLIT_KINDS,
              seed: int = DEFAULT_SEED, book: bool = True, reports: bool = True, cell_timeout: int = 4 * 3600,
              external: str | Path | None = None, executor: str = "local", scheduler: str | None = None,
              seeds: int | None = None, sweep_cnn: bool = False) -> Path:
    """Train every architecture through the training notebook, then the report notebooks and the book.

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
    what = plan(preset, archs, splits, seed, seeds, jobs, executor, scheduler)
    study = StudyFolder(Path(out or Path("studies") / Path(preset).stem).resolve())
    study.refuse_foreign()
    root = Path(data_dir(data)).resolve()
    dataset = load_dataset(root)
    if external and load_dataset(external).manifest_hash == dataset.manifest_hash:
        raise CovidlibError(f"--external {external} is the study's own dataset; an external test must be other data")
    t_start = time.perf_counter()
    _train_runs(what, study, dataset, force, cell_timeout, retrain=reports)
    if reports:
        own = {"validity": {"sweep_cnn": sweep_cnn, "scan_folds": what.scan_folds},
               "explainability": {"sanity_slices": what.sanity_slices}}
        _run_reports(study, root, external, cell_timeout, own, jobs=what.jobs if what.executor == "local" else 1)
    failed = study.failures()
    study.set_status("study", status="finished", wall_seconds=round(time.perf_counter() - t_start),  # not a run
                     reports=reports)
    print(f"study finished in {time.perf_counter() - t_start:.0f} s; "
          + (f"failed: {', '.join(failed)}" if failed else "all runs and notebooks succeeded"), flush=True)
    if book:
        print(f"book: {build_book(study.path)}", flush=True)
    return study.path


def _train_runs(what: StudyPlan, study: StudyFolder, dataset: Dataset, force: bool, cell_timeout: int,
                retrain: bool = True) -> None:
    """The training notebooks of every run not finished yet, through the plan's executor; with
    ``retrain``, then the validity notebook's retrainings (:class:`RetrainingRun`)."""
    created = not study.path.exists()
    study.runs_dir.mkdir(parents=True, exist_ok=True)
    try:  # a cluster that does not answer, or cannot see the study, stops it before anything is written
        pool = make_executor(what.executor, jobs=what.jobs, scheduler=what.scheduler, shared=[study.path, dataset.root])
    except BaseException:
        if created:
            shutil.rmtree(study.path, ignore_errors=True)
        raise
    if force:
        for folder in (study.runs_dir, *map(study.experiment_dir, EXPERIMENTS)):  # all trained on the old splits
            shutil.rmtree(folder, ignore_errors=True)
        study.clear_status()
    try:
        split_files = prepare_splits(study, dataset, what.splits, what.seed, force=force, val_seeds=what.extra_seeds())
        print(f"study {study.path}: {len(what.runs())} training runs ({', '.join(what.archs)}) on {dataset.root} "
              f"[{len(dataset.manifest)} images], preset {what.preset}", flush=True)
        todo = [run for name in what.runs() if (run := _training_run(what, study, name, split_files, dataset.root, cell_timeout))]
        todo += _retraining_runs(what, study, dataset, split_files) if retrain else []
        with notebooks.kernels_render_for_the_book():
            _train_all(todo, pool, study)
    finally:
        pool.close()


def _training_run(what: StudyPlan, study: StudyFolder, name: RunName, split_files: dict, root: Path,
                  cell_timeout: int) -> TrainingRun | None:
    """The papermill execution that trains ``name``; None (and said) when it finished earlier."""
    key, run_seed = str(name), what.seed if name.seed is None else name.seed
    executed = study.training_notebook(name)
    if study.run(name).finished and executed.exists():
        study.set_status(key, status="done", skipped=True, seconds=study.status().get(key, {}).get("seconds"))
        print(f"  {key} finished earlier (skipped)", flush=True)
        return None
    params = {"arch": name.arch, "preset": str(what.preset), "data": str(root),
              "split": split_files[name.kind, name.seed], "run_dir": str(study.run(name).path),
              "seed": run_seed, "backbone_seed": what.seed,
              "maps": name.seed is None}  # an extra seed's maps would repeat its main run's, at ~30 s a run
    return TrainingRun(key, f"{name.arch} on the {name.kind} split, seed {run_seed}", params,
                       str(notebooks.notebook_dir() / "train.ipynb"), str(executed), str(study.path), cell_timeout)


def _run_reports(study: StudyFolder, root: Path, external, cell_timeout: int, own: dict[str, dict],
                 jobs: int = 1) -> None:
    """The report notebooks, here, once every run they read has finished; ``own`` holds a notebook's
    own parameters by its name (the validity experiments' settings, say). With ``jobs`` > 1 the
    explainability notebook, the longest and independent of the others, runs beside them."""
    def report(name: str) -> None:
        t0 = time.perf_counter()
        params = {"study_dir": str(study.path), "data": str(root), **own.get(name, {})}
        if name in ("validity", "comparison") and external:
            params["external"] = str(Path(external).resolve())
        try:
            notebooks.run_notebook(notebooks.notebook_dir() / f"{name}.ipynb", study.report_notebook(name),
                                   params, study.path, cell_timeout)
            study.set_status(f"notebook:{name}", status="done", seconds=round(time.perf_counter() - t0, 1))
        except Exception as exc:
            study.set_status(f"notebook:{name}", status="failed", error=str(exc).strip().splitlines()[-1][:300])
            print(f"  notebook {name}: FAILED", file=sys.stderr, flush=True)

    beside = ["explainability"] if jobs > 1 else []
    lanes = [lane for lane in ([n for n in REPORT_NOTEBOOKS if n not in beside], beside) if lane]
    with notebooks.kernels_render_for_the_book(), ThreadPoolExecutor(len(lanes)) as pool:
        list(pool.map(lambda lane: [report(name) for name in lane], lanes))


def _train_all(runs: list[TrainingRun], executor, study: StudyFolder) -> None:
    """Every run through ``executor``; each outcome recorded and printed as it comes."""
    t_start, durations = time.perf_counter(), []
    for run in runs:
        study.set_status(run.key, status="running")
    if not runs:
        return
    for done, (run, outcome) in enumerate(executor.run(_run_training, runs), start=1):
        if isinstance(outcome, BaseException):
            lines = str(outcome).strip().splitlines()
            reason = next((ln for ln in reversed(lines) if ln.strip()), type(outcome).__name__)[:300]
            study.set_status(run.key, status="failed", error=reason)
            print(f"  {run.key}: FAILED ({reason})", file=sys.stderr, flush=True)
            line = f"{run.key} FAILED"
        else:
            study.set_status(run.key, status="done", seconds=round(outcome, 1))
            durations.append(outcome)
            line = f"{run.key} done in {outcome:.0f} s"
        left = len(runs) - done
        eta = sum(durations) / len(durations) * left / getattr(executor, "jobs", 1) if durations else float("nan")
        print(f"[{done}/{len(runs)}] {line}; {time.perf_counter() - t_start:.0f} s elapsed"
              + (f", about {eta / 60:.0f} min left" if left and durations else ""), flush=True)
