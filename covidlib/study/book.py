"""Build the Jupyter Book (version 1) offline from a study's executed notebooks.

Three things the book would fetch from CDNs are taken from npm packages instead
(require.js, the ipywidgets HTML manager, MathJax) and served from ``_vendor_static``, with
the installed plotly's plotly.js, loaded once by every page.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from plotly.offline import get_plotlyjs

from covidlib import CovidlibError
from covidlib.paths import cache_dir, project_dir
from covidlib.study.folder import StudyFolder
from covidlib.study.report import what_ran

VENDOR = {  # npm package -> (file inside its tarball, name under _vendor_static)
    "requirejs@2.3.8": ("package/require.js", "require.js"),
    "@jupyter-widgets/html-manager@1.0.15": ("package/dist/embed-amd.js", "embed-amd.js"),
    "mathjax@3.2.2": ("package/es5/tex-svg.js", "mathjax/tex-svg.js"),
}


def vendor_assets() -> Path:
    """Fetch the three JavaScript files from the npm registry once per cache (``npm pack``)."""
    static = cache_dir() / "book-vendor"
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


def stage_book(study: Path) -> Path:
    """``study/book``: the book's config and chapters, with the executed notebooks in ``book/results``.

    The book is built inside the study, so a study made from an installed wheel builds its
    book too, and nothing is written into the repository.
    """
    stage = StudyFolder(study).book_dir
    notebooks = sorted(StudyFolder(study).notebooks_dir.glob("*.ipynb"))
    if not notebooks:
        raise CovidlibError(f"study {study} has no executed notebooks to build a book from")
    src = project_dir()
    shutil.rmtree(stage / "book", ignore_errors=True)  # chapters and results of an earlier build
    stage.mkdir(parents=True, exist_ok=True)
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy(src / name, stage / name)
    shutil.copytree(src / "book", stage / "book", ignore=shutil.ignore_patterns("results"))
    results = stage / "book" / "results"
    results.mkdir()
    short = what_ran(study, full=False)
    (results / WHAT_RAN).write_text(what_ran(study))  # the chapters include these two
    (results / WHAT_RAN_SHORT).write_text(short)
    for nb in notebooks:
        copy_for_reader(nb, results / nb.name, short)
    write_static(stage)
    return stage


WHAT_RAN, WHAT_RAN_SHORT = "what_ran.md", "what_ran_short.md"  # in book/results, beside the notebooks


def write_static(root: Path) -> None:
    """``root/_vendor_static``: the vendored JavaScript, the installed plotly's plotly.js, the CSS."""
    shutil.copytree(vendor_assets(), root / "_vendor_static", dirs_exist_ok=True)
    _write_plotly_js(root / "_vendor_static" / "plotly.min.js")
    (root / "_vendor_static" / "covidlib.css").write_text(BOOK_CSS)


def setup(app) -> dict:
    """A Sphinx extension (``_config.yml``'s ``extra_extensions``) for a build of the checkout itself
    (``jupyter-book build .``): it refuses, in one line, a checkout with no published study, whose
    chapters would be empty sentences, and writes ``_vendor_static`` where it is missing."""
    def check(app, config) -> None:
        source = Path(app.srcdir)
        if not (source / "book" / "results" / WHAT_RAN).exists():  # SystemExit: no traceback after the line
            raise SystemExit("covidlib: no published study in book/results: run `covidlib study --preset cpu` and "
                             "`covidlib publish studies/cpu` (or `covidlib study`, which builds its own book)")
        if not (source / "_vendor_static" / "plotly.min.js").exists():
            try:
                write_static(source)
            except CovidlibError as exc:
                raise SystemExit(f"covidlib: {exc}") from None

    app.connect("config-inited", check)  # before the builder looks for _vendor_static
    return {"parallel_read_safe": True}


# Wide tables of numbers with CIs (Table 1 has twelve columns): smaller type, cells that wrap only
# between a value and its interval, and a scroll bar rather than a squeezed table.
BOOK_CSS = """\
.output table, .cell_output table { font-size: 0.8em; display: block; overflow-x: auto; }
.output td, .output th, .cell_output td, .cell_output th { padding: 0.2em 0.45em; }
"""


def _write_plotly_js(dest: Path) -> None:
    """The installed plotly's plotly.js, which every page loads (``html_js_files`` in _config.yml):
    one file the browser caches for the whole book instead of several MB inlined per page."""
    dest.write_text(get_plotlyjs())


def copy_for_reader(notebook: Path, dest: Path, banner: str = "") -> None:
    """Copy an executed notebook for the book: its parameters hidden (the defaults would name another
    model; the injected ones hold machine paths; the page's settings table shows the run's own), and
    a training page titled for its run ("DenseNet201, scan split"), not the
    notebook's generic title, so the sidebar tells the 18 pages apart."""
    nb = json.loads(notebook.read_text())
    for cell in nb["cells"]:
        tags = cell.setdefault("metadata", {}).setdefault("tags", [])
        if {"injected-parameters", "parameters"} & set(tags) and "remove-cell" not in tags:
            tags.append("remove-cell")
    title = StudyFolder.notebook_title(notebook)
    first = next((c for c in nb["cells"] if c["cell_type"] == "markdown"), None)
    if first is not None:
        head, _, rest = "".join(first["source"]).partition("\n")
        first["source"] = f"{'# ' + title if title else head}\n\n{banner}\n{rest}"
    dest.write_text(json.dumps(nb))


def build_book(study: str | Path, strict: bool = True) -> Path:
    """Stage the book in the study folder and run ``jupyter-book build``; returns the index page."""
    stage = stage_book(Path(study).resolve())
    exe = Path(sys.executable).with_name("jupyter-book")
    # --all: Sphinx rebuilds only changed sources, and a chapter whose glued numbers come from a
    # rerun notebook has not changed, so without it the prose keeps the previous study's numbers.
    cmd = [str(exe if exe.exists() else "jupyter-book"), "build", str(stage), "--all", "--keep-going"]
    if strict:
        cmd += ["-W", "-n"]
    try:
        done = subprocess.run(cmd, cwd=stage, capture_output=True, text=True)
    except FileNotFoundError:
        raise CovidlibError('building the book needs jupyter-book: pip install "covidlib[book]"') from None
    log = stage.parent / "book-build.log"
    log.unlink(missing_ok=True)  # a failed earlier build's log would outlive a good build
    if done.returncode != 0:
        log.write_text(done.stdout + done.stderr)
        raise CovidlibError(f"jupyter-book build failed; see {log}")
    return stage / "_build" / "html" / "index.html"
