"""The notebooks a study runs: where they are, a copy for JupyterLab users, and one executed as a study does
(papermill, a quiet kernel, figures rendered for the offline book)."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from covidlib import CovidlibError
from covidlib.paths import project_dir

# Set in the kernels a study starts: the notebooks then render for the offline book
# (plotly.js loaded once by the book), not for whatever front end a person would use (notebook.setup).
BOOK_ENV = "COVIDLIB_BOOK"


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


@contextmanager
def kernels_render_for_the_book():
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


def run_notebook(notebook: Path, out: Path, parameters: dict, cwd: Path, timeout: int) -> None:
    """Execute ``notebook`` with ``parameters`` into ``out``, which appears only when it ran through."""
    try:
        import papermill as pm  # the [study] extra; its absence gets one line, not an ImportError
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
