"""Build the Jupyter Book (version 1) offline from a study's executed notebooks.

Three things the book would fetch from CDNs are taken from npm packages instead
(require.js, the ipywidgets HTML manager, MathJax) and served from ``_vendor_static``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from covidlib import CovidlibError

VENDOR = {  # npm package -> (file inside its tarball, name under _vendor_static)
    "requirejs@2.3.8": ("package/require.js", "require.js"),
    "@jupyter-widgets/html-manager@1.0.15": ("package/dist/embed-amd.js", "embed-amd.js"),
    "mathjax@3.2.2": ("package/es5/tex-svg.js", "mathjax/tex-svg.js"),
}


def book_root() -> Path:
    root = Path.cwd()
    if not (root / "_config.yml").exists() or not (root / "_toc.yml").exists():
        raise CovidlibError(f"no _config.yml/_toc.yml in {root}; build the book from the repository root")
    return root


def vendor_assets(root: Path) -> Path:
    """Fetch the three JavaScript files from the npm registry once (``npm pack``)."""
    static = root / "_vendor_static"
    if all((static / name).exists() for _, name in VENDOR.values()):
        return static
    npm = shutil.which("npm")
    if npm is None:
        raise CovidlibError("building the book offline needs npm (Node.js) to fetch require.js, "
                            "the ipywidgets HTML manager and MathJax from the npm registry")
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run([npm, "pack", "--silent", *VENDOR], cwd=tmp, capture_output=True, text=True)
        if done.returncode != 0:
            raise CovidlibError(f"npm pack failed: {done.stderr.strip().splitlines()[-1] if done.stderr else '?'}")
        for tgz in Path(tmp).glob("*.tgz"):
            with tarfile.open(tgz) as tar:
                for member, name in VENDOR.values():
                    try:
                        data = tar.extractfile(member)
                    except KeyError:
                        continue
                    if data is not None:
                        target = static / name
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.write_bytes(data.read())
    missing = [name for _, name in VENDOR.values() if not (static / name).exists()]
    if missing:
        raise CovidlibError(f"npm packages did not provide: {', '.join(missing)}")
    return static


def build_book(study: str | Path, root: Path | None = None, strict: bool = True) -> Path:
    """Copy the study's executed notebooks into book/results and run ``jupyter-book build``."""
    root = root or book_root()
    study = Path(study)
    results = root / "book" / "results"
    shutil.rmtree(results, ignore_errors=True)
    results.mkdir(parents=True)
    notebooks = sorted((study / "notebooks").glob("*.ipynb"))
    if not notebooks:
        raise CovidlibError(f"study {study} has no executed notebooks to build a book from")
    for nb in notebooks:
        shutil.copy(nb, results / nb.name)
    vendor_assets(root)
    exe = Path(sys.executable).with_name("jupyter-book")
    # --all: Sphinx rebuilds only changed sources, and a chapter whose glued numbers come from a
    # rerun notebook has not changed, so without it the prose keeps the previous study's numbers.
    cmd = [str(exe if exe.exists() else "jupyter-book"), "build", str(root), "--all", "--keep-going"]
    if strict:
        cmd += ["-W", "-n"]
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    if done.returncode != 0:
        log = study / "book-build.log"
        log.write_text(done.stdout + done.stderr)
        raise CovidlibError(f"jupyter-book build failed; see {log}")
    return root / "_build" / "html" / "index.html"
