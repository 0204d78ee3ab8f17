"""Where data, caches and runs live. Nothing is ever written beside a dataset."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from covidlib import CovidlibError

PACKAGE_DIR = Path(__file__).resolve().parent
SAMPLE_DATA = PACKAGE_DIR / "sample_data"


def project_dir() -> Path:
    """The folder holding ``notebooks/``, ``book/``, ``_config.yml`` and ``_toc.yml``.
    A clone (or editable install) has them at the repository root; a wheel carries a copy in
    ``covidlib/project/`` (see setup.py), so ``covidlib study`` works without a clone.
    """
    for candidate in (PACKAGE_DIR.parent, PACKAGE_DIR / "project"):
        if (candidate / "notebooks" / "train.ipynb").exists() and (candidate / "_toc.yml").exists():
            return candidate
    raise CovidlibError(f"covidlib's notebooks are missing (looked in {PACKAGE_DIR.parent} and {PACKAGE_DIR / 'project'}); "
                        "reinstall covidlib")


def repository_root() -> Path | None:
    """The clone this package runs from, or None for an installed wheel."""
    root = PACKAGE_DIR.parent
    return root if (root / "pyproject.toml").exists() and (root / "notebooks").is_dir() else None


def cache_dir() -> Path:
    """``$COVIDLIB_CACHE``, else the user's cache directory (XDG on Linux)."""
    env = os.environ.get("COVIDLIB_CACHE")
    if env:
        path = Path(env).expanduser()
    else:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        path = Path(base) / "covidlib"
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_key(kind: str, version: int, *parts) -> str:
    """The one way a cached artefact is named: what it is, its format version, and everything it
    depends on (hashed). Bump ``version`` when the artefact changes for the same inputs."""

    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).hexdigest()[:24]
    return f"{kind}-v{version}-{digest}"


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """An explicit ``--data``, else ``$COVIDLIB_DATA``, else the embedded sample."""
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get("COVIDLIB_DATA")
    if env:
        return Path(env).expanduser()
    return SAMPLE_DATA


@contextmanager
def atomic_path(target: Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it over ``target`` only on success.
    An interrupted writer leaves at most a ``.tmp-*`` file that no reader looks at.
    """
    target = Path(target)
    if target.is_dir():
        raise CovidlibError(f"{target} is a folder; a file was expected there")
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(target.parent, f".tmp-{target.name}-pid*-*")
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{target.name}-pid{os.getpid()}-", suffix=suffix, dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    except OSError as exc:
        if exc.filename:  # it names its file already
            raise
        # a full disk or a quota: the write itself names no file, so the one-line error would not either
        raise CovidlibError(f"{target}: cannot write it ({exc.strerror or type(exc).__name__})") from None
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def read_json(path: Path, what: str = "file") -> dict:
    """A JSON object from ``path``, or a one-line error naming the file (damaged, truncated, not JSON)."""
    try:
        value = json.loads(Path(path).read_text())
    except OSError as exc:
        raise CovidlibError(f"{path}: cannot read the {what} ({exc.strerror or type(exc).__name__})") from None
    except ValueError as exc:
        raise CovidlibError(f"{path}: the {what} is damaged (not valid JSON: {str(exc).splitlines()[0]})") from None
    if not isinstance(value, dict):
        raise CovidlibError(f"{path}: the {what} is damaged (a JSON object was expected)")
    return value


def remove_orphans(folder: Path, pattern: str) -> None:
    """Delete temporary files or folders (``...-pidN-...``) whose writing process no longer exists:
    a killed writer cannot clean up after itself, and its partial file is never read."""

    for tmp in folder.glob(pattern):
        match = re.search(r"-pid(\d+)-", tmp.name)
        if match is None or _alive(int(match.group(1))):
            continue
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def write_text_atomic(target: Path, text: str) -> None:
    with atomic_path(Path(target)) as tmp:
        tmp.write_text(text)


def shown(path: str | os.PathLike) -> str:
    """A path as a reader should see it: relative to the working folder when inside it.
    The book's pages are executed with the study folder as working folder, so they show
    ``runs/basic_cnn-random``, never the build machine's absolute paths.
    """
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except (ValueError, OSError):
        return str(path)


def printable(text: str) -> str:
    """Control characters escaped: a file name holding a newline or an ESC sequence can neither
    forge a second line on a terminal nor drive it. Every file name covidlib prints goes through it."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def git_commit() -> str:
    """The checkout's short commit (with ``+dirty`` for uncommitted changes); a wheel has none."""
    root = repository_root()
    if root is None:
        return "not a git checkout"
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "not a git checkout"
    return f"{head}+dirty" if head and dirty else head or "not a git checkout"
