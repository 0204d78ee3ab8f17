"""Where a study's training runs execute: a local thread pool, or a Dask cluster.

A training run is one papermill execution of the training notebook; runs are independent, so
an executor only has to call one function per run and report each outcome as it comes. The
study itself (status, progress, report notebooks, book) stays where it was started.

Dask's contract is shared storage: the study folder and the data must be visible to every
worker at the same path. A worker lost mid-run has its task rescheduled by Dask's scheduler;
the training notebook trains with ``resume=True``, so the run continues from its last
checkpoint instead of starting over.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from covidlib import CovidlibError

EXECUTORS = ("local", "dask")


class LocalExecutor:
    """Today's pool: ``jobs`` runs at a time in this process (each notebook has its own kernel)."""
    def __init__(self, jobs: int = 1):
        self.jobs = jobs

    def run(self, fn: Callable, items: Iterable) -> Iterator[tuple[object, float | BaseException]]:
        """``(item, fn(item))`` or ``(item, exception)`` for every item, in the order they finish."""
        with ThreadPoolExecutor(max_workers=self.jobs) as pool:
            futures = {pool.submit(fn, item): item for item in items}
            for future in as_completed(futures):
                yield futures[future], _outcome(future)

    def close(self) -> None:
        pass


def _outcome(future):
    try:
        return future.result()
    except Exception as exc:  # noqa: BLE001 - one run failing must not stop the others
        return exc


class DaskExecutor:
    """Each run is a task on a Dask cluster: an existing one (``scheduler``) or a LocalCluster."""
    def __init__(self, scheduler: str | None = None, jobs: int = 1, *, shared: Iterable[Path] = (),
                 timeout: float = 10):
        self.jobs = jobs
        try:
            from distributed import Client
        except ImportError:
            raise CovidlibError('--executor dask needs Dask: pip install "covidlib[dask]"') from None
        self.cluster = None
        if scheduler:
            try:
                self.client = Client(scheduler, timeout=f"{timeout}s")
            except (OSError, TimeoutError) as exc:
                raise CovidlibError(f"--scheduler {scheduler}: no Dask scheduler answered "
                                    f"({type(exc).__name__}); start one with `dask scheduler`") from None
        else:
            self.cluster = local_cluster(jobs)
            self.client = Client(self.cluster)
        try:
            check_shared_storage(self.client, list(shared))
        except BaseException:
            self.close()
            raise

    def run(self, fn: Callable, items: Iterable) -> Iterator[tuple[object, float | BaseException]]:
        from distributed import as_completed as dask_completed

        items = list(items)
        workers = len(self.client.scheduler_info().get("workers", {}))
        print(f"  {len(items)} runs sent to the Dask scheduler at {self.client.scheduler.address} ({workers} workers)",
              flush=True)
        futures = {self.client.submit(fn, item, key=f"covidlib-{_key(item)}-{uuid.uuid4().hex[:8]}", pure=False): item
                   for item in items}
        for future in dask_completed(futures):
            yield futures[future], _outcome(future)

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def _key(item) -> str:
    return str(getattr(item, "key", item))


def visible_gpus() -> int:
    """How many NVIDIA GPUs this machine has, without importing TensorFlow (``nvidia-smi -L``)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(line.startswith("GPU ") for line in out.splitlines())


def worker_specs(jobs: int, gpus: int) -> dict[str, dict]:
    """One single-threaded worker per GPU, each pinned to its device; else ``jobs`` CPU workers.
    Memory limits are off: a worker only waits on its notebook's kernel, whose memory (the
    model) the nanny does not see, and a limit would kill workers for nothing.
    """
    from distributed import Nanny

    def spec(env: dict) -> dict:
        return {"cls": Nanny, "options": {"nthreads": 1, "memory_limit": 0, "env": env}}

    if gpus:
        devices = os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(gpus)))).split(",")
        return {f"gpu-{d.strip()}": spec({"CUDA_VISIBLE_DEVICES": d.strip()}) for d in devices[:gpus]}
    return {f"cpu-{i}": spec({}) for i in range(jobs)}


def local_cluster(jobs: int):
    """A cluster on this machine: one worker per GPU when there are GPUs, else ``jobs`` workers."""
    # Workers are spawned processes that configure logging when they import distributed; without
    # this, every worker start, stop and slow event loop is an INFO line in the study's output.
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "error")
    logging.getLogger("distributed").setLevel(logging.ERROR)
    from distributed import Scheduler, SpecCluster

    return SpecCluster(workers=worker_specs(jobs, visible_gpus()),
                       scheduler={"cls": Scheduler, "options": {"dashboard_address": None}}, silence_logs=50)


def _sees(paths: list[str], token_file: str, token: str) -> list[str]:
    """On a worker: which of ``paths`` it cannot see, and whether it reads the coordinator's token."""
    missing = [p for p in paths if not Path(p).exists()]
    try:
        if Path(token_file).read_text() != token:
            missing.append(token_file)
    except OSError:
        missing.append(str(Path(token_file).parent))
    return missing


def check_shared_storage(client, paths: list[Path]) -> None:
    """Every worker must see the study folder (a file written here, read there) and the data."""
    if not paths:
        return
    study = paths[0]
    token = uuid.uuid4().hex
    token_file = study / f".shared-storage-check-{token[:8]}"
    token_file.write_text(token)
    try:
        answers = client.run(_sees, [str(p) for p in paths], str(token_file), token)
    finally:
        token_file.unlink(missing_ok=True)
    if not answers:
        raise CovidlibError("the Dask cluster has no workers; start some with `dask worker ADDRESS`")
    for worker, missing in sorted(answers.items()):
        if missing:
            raise CovidlibError(f"Dask worker {worker} cannot see {missing[0]}; the study folder and the data must "
                                "be on storage every worker shares, at the same path")


def make_executor(kind: str, *, jobs: int = 1, scheduler: str | None = None, shared: Iterable[Path] = ()):
    """``local`` or ``dask`` (arguments checked by the study before anything is written)."""
    if kind == "local":
        return LocalExecutor(jobs)
    return DaskExecutor(scheduler, jobs, shared=shared)
