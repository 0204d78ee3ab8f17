"""``covidlib publish``: a finished study's pages into the checkout's ``book/results``, compact for git,
so that ``jupyter-book build .`` in a clone builds the case study without training anything.

What goes in: the four report notebooks and the main seed's training notebooks, as the study's own
book shows them (parameters hidden, pages titled for their run), plus the What ran boxes the
chapters include and the dataset's licence. What is left out: plotly's JSON copy of every figure
(the page uses the HTML one), image traces as arrays of numbers (re-encoded as PNG), stderr logs,
widget state (the book's map explorer needs no kernel), the parameters papermill injected and its
metadata, and machine paths.
"""

from __future__ import annotations

import ast
import base64
import json
import re
import shutil
from pathlib import Path

import numpy as np
from plotly.io import to_html

from covidlib import CovidlibError
from covidlib.paths import PACKAGE_DIR, project_dir
from covidlib.plots import png_source
from covidlib.study.book import WHAT_RAN, WHAT_RAN_SHORT, copy_for_reader
from covidlib.study.folder import RunName, StudyFolder
from covidlib.study.report import what_ran

REPORTS = ("dataset", "comparison", "validity", "explainability")
PLOTLY_MIME = "application/vnd.plotly.v1+json"
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
BUDGET_MB = 25


def published_dir() -> Path:
    """``book/results`` of the checkout this covidlib runs from (refused outside a clone)."""
    root = project_dir()
    if not (root / "_toc.yml").exists():
        raise CovidlibError("covidlib publish writes into a clone's book/results; this covidlib is installed "
                            "without one (pass --into DIR)")
    return root / "book" / "results"


def publish(study_dir: str | Path, into: str | Path | None = None) -> Path:
    """Copy ``study_dir``'s pages into ``into`` (default: the checkout's ``book/results``), replacing
    what was there; returns the folder. Refuses a study whose report notebooks did not all run."""
    study = StudyFolder(Path(study_dir).resolve())
    missing = [name for name in REPORTS if not study.report_notebook(name).exists()]
    if missing:
        raise CovidlibError(f"{study.path} has no executed {', '.join(missing)} notebook; run covidlib study first")
    dest = Path(into).resolve() if into else published_dir()
    trained = [study.training_notebook(name) for name in study.runs() if (n := RunName.parse(name)) and n.seed is None]
    roots = {str(study.path): "STUDY", str(study.data_root()): study.data_root().name}
    staging = dest.with_name(f".{dest.name}-publishing")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    short = what_ran(study.path, full=False)
    for notebook in [*map(study.report_notebook, REPORTS), *(p for p in trained if p.exists())]:
        copy_for_reader(notebook, staging / notebook.name, short)
        compact(staging / notebook.name, roots)
    (staging / WHAT_RAN).write_text(what_ran(study.path))
    (staging / WHAT_RAN_SHORT).write_text(short)
    shutil.copy(PACKAGE_DIR / "sample_data" / "LICENSE.md", staging / "LICENSE.md")
    size = sum(f.stat().st_size for f in staging.iterdir()) / 2**20
    if size > BUDGET_MB:
        shutil.rmtree(staging)
        raise CovidlibError(f"the published study would take {size:.1f} MB, over the {BUDGET_MB} MB budget")
    shutil.rmtree(dest, ignore_errors=True)
    staging.rename(dest)
    if into is None:  # the checkout's own book: its README leads with these findings
        write_findings(dest.parents[1] / "README.md", dest)
    return dest


def compact(notebook: Path, roots: dict[str, str]) -> None:
    """Rewrite an executed notebook for git: see the module docstring for what goes."""
    nb = json.loads(notebook.read_text())
    # the injected parameters (hidden on the page) and papermill's record name this machine's paths
    nb["cells"] = [c for c in nb["cells"] if "injected-parameters" not in c.get("metadata", {}).get("tags", [])]
    nb.get("metadata", {}).pop("papermill", None)
    for cell in nb["cells"]:
        outputs = []
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream" and out.get("name") == "stderr":
                continue
            data = out.get("data", {})
            if any(key.endswith(WIDGET_MIME) for key in data):  # the book's explorer needs no kernel, no widget
                continue
            for key in [k for k in data if k.endswith(PLOTLY_MIME)]:  # glued outputs carry a prefix
                figure = _png_images(data.pop(key))
                data[key[: -len(PLOTLY_MIME)] + "text/html"] = to_html(
                    figure, include_plotlyjs=False, include_mathjax=False, full_html=False, default_width="100%",
                    default_height=525, validate=False)
            outputs.append(out)
        if "outputs" in cell:
            cell["outputs"] = outputs
    nb.get("metadata", {}).pop("widgets", None)
    text = json.dumps(nb, separators=(",", ":"), ensure_ascii=False)  # a non-ASCII path stays findable
    for root, name in sorted(roots.items(), key=lambda r: -len(r[0])):  # the longest path first
        text = text.replace(root, name)
    notebook.write_text(text)


def _png_images(figure: dict) -> dict:
    """Image traces stored as pixel values (nested lists, or plotly's typed arrays: base64 of the raw
    bytes with a dtype and shape), re-encoded as PNG data URIs."""
    for trace in figure.get("data", []):
        if trace.get("type") == "image" and "z" in trace:
            z = trace.pop("z")
            if isinstance(z, dict):
                shape = tuple(int(n) for n in str(z["shape"]).split(","))
                z = np.frombuffer(base64.b64decode(z["bdata"]), dtype=z["dtype"]).reshape(shape)
            trace["source"] = png_source(z)
    return figure


MACHINE_PATH = re.compile(r"(/(?:home|root|tmp|work|Users|var/folders)/[^\s\"'<>]+)")


def machine_paths(folder: str | Path) -> list[str]:
    """Absolute paths of this machine left in published files (the publish test's check)."""
    return [m for f in sorted(Path(folder).iterdir()) if f.is_file() for m in MACHINE_PATH.findall(f.read_text())]


# The README's key findings: sentences the published notebooks glued, each with its chapter.
FINDINGS = (("Reproduction", "comparison", "table1_sentence", "book/results.md"),
            ("Scans", "dataset", "scan_sentence", "book/dataset.md"),
            ("Random against scan split", "validity", "drop_sentence", "book/validity.md"),
            ("Cross-validation over scans", "validity", "fold_sentence", "book/validity.md"),
            ("Outside the lungs", "validity", "masked_sentence", "book/validity.md"),
            ("Another source", "validity", "external_sentence", "book/validity.md"))
FINDINGS_START, FINDINGS_END = "<!-- findings: written by covidlib publish -->", "<!-- /findings -->"


def glued_text(notebook: Path) -> dict[str, str]:
    """The text values a notebook glued (myst-nb keeps them as Python reprs)."""
    values = {}
    for cell in json.loads(notebook.read_text())["cells"]:
        for out in cell.get("outputs", []):
            name = out.get("metadata", {}).get("scrapbook", {}).get("name")
            text = out.get("data", {}).get("application/papermill.record/text/plain")
            if name and text is not None:
                values[name] = ast.literal_eval(text) if text and text[0] in "'\"" else text
    return values


def key_findings(results: Path) -> str:
    """The README's findings block, from the notebooks published in ``results``."""
    glued = {name: glued_text(results / f"{name}.ipynb") for name in {f[1] for f in FINDINGS}}
    lines = [f"- **{label}.** {glued[notebook][key]} ([chapter]({chapter}))" for label, notebook, key, chapter in FINDINGS
             if key in glued[notebook]]
    return "\n".join([FINDINGS_START, *lines, FINDINGS_END])


def write_findings(readme: Path, results: Path) -> None:
    """Replace the README's findings block (between its markers) with the published study's."""
    text = readme.read_text()
    start, end = text.find(FINDINGS_START), text.find(FINDINGS_END)
    if start < 0 or end < start:
        raise CovidlibError(f"{readme} has no findings block ({FINDINGS_START} ... {FINDINGS_END}) to write into")
    readme.write_text(text[:start] + key_findings(results) + text[end + len(FINDINGS_END):])
