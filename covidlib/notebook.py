"""What only a notebook needs: set-up (versions, plotly's renderer, Colab), glue for the book,
finding the study a report shows, and the ipywidgets map explorer.

Everything a notebook shows otherwise comes from the library (``covidlib.evaluate``,
``covidlib.explain``, ``covidlib.study.findings``, ``covidlib.data.figures``).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import cv2
import ipywidgets as w
import plotly.io as pio
from IPython.display import HTML, Markdown
from plotly.io import to_html
from plotly.io.base_renderers import HtmlRenderer

from covidlib import CovidlibError
from covidlib.data.fetch import fetch
from covidlib.evaluate.tables import title
from covidlib.explain.explorer import explorer_data, explorer_html, explorer_slices
from covidlib.explain.layers import overlay
from covidlib.explain.maps import explain, spatial_layers, supported_methods
from covidlib.models.runs import RunFolder
from covidlib.paths import repository_root
from covidlib.runtime import gpus, versions
from covidlib.study.folder import StudyFolder
from covidlib.study.notebooks import BOOK_ENV
from covidlib.study.runner import QUICK_ARCHS, quick_study
from covidlib.vocabulary import CLASS_KEYS


def setup() -> dict:
    """Versions in use, and plotly's renderer: its own choice where a person runs the notebook.

    Plotly detects Colab, JupyterLab and VS Code by itself; only the kernels ``covidlib study``
    starts for the offline book ask for :data:`BOOK_RENDERER`: figures as HTML that call the
    ``Plotly`` the book loads once for all pages (``covidlib.book``), plus plotly's own mimetype
    for JupyterLab.
    """
    if os.environ.get(BOOK_ENV):
        pio.renderers[BOOK_RENDERER] = _book_renderer()
        pio.renderers.default = f"plotly_mimetype+{BOOK_RENDERER}"
    return {**versions(), "plotly_renderer": pio.renderers.default}


BOOK_RENDERER = "covidlib_book"


def _book_renderer():
    """A figure as a div and a ``Plotly.newPlot`` call: no plotly.js, no MathJax from a CDN."""

    class BookRenderer(HtmlRenderer):
        def activate(self):  # plotly.js comes from the book's _static, once for every page
            pass

        def to_mimebundle(self, fig_dict):
            return {"text/html": to_html(fig_dict, include_plotlyjs=False, include_mathjax=False, full_html=False,
                                         default_width="100%", default_height=525, validate=False)}

    return BookRenderer(include_plotlyjs=False)


def in_colab() -> bool:
    """True on Google Colab (its ``google.colab`` package is importable)."""
    try:
        return importlib.util.find_spec("google.colab") is not None
    except ModuleNotFoundError:  # no ``google`` package at all
        return False


def glue(name: str, value, display: bool = False) -> None:
    """myst-nb glue when it is installed (the book), a no-op otherwise (Colab).

    A plotly figure is glued as its mime bundle: IPython's formatter would call the figure's
    ``_ipython_display_``, which shows it at once and leaves the glue empty. Markdown is glued as
    HTML: a page can paste another notebook's glue only as a display (``{glue:}``), which shows a
    Markdown object's text/plain repr, never its Markdown.
    """
    try:
        from myst_nb import glue as _glue  # the [book] extra; Colab has no myst-nb
    except ImportError:
        return
    if isinstance(value, Markdown):
        from markdown_it import MarkdownIt  # myst-nb's own parser, so installed with it

        value = HTML(MarkdownIt("commonmark").enable("table").render(value.data))
    if hasattr(value, "_ipython_display_") and hasattr(value, "_repr_mimebundle_"):
        value = _MimeBundle(value._repr_mimebundle_())
    _glue(name, value, display=display)


class _MimeBundle:
    def __init__(self, bundle: dict):
        self.bundle = bundle

    def _repr_mimebundle_(self, include=None, exclude=None):
        return self.bundle


EXTERNAL_ENV = "COVIDLIB_EXTERNAL"


def external_folder(external: str | Path | None) -> Path | None:
    """The external test folder: ``external`` if given, else ``$COVIDLIB_EXTERNAL``, else none."""
    chosen = external or os.environ.get(EXTERNAL_ENV)
    return Path(chosen).expanduser().resolve() if chosen else None


def map_explorer(study_dir: str | Path) -> HTML:
    """The kernel-free explorer (explain/explorer.py) over the main split's models: it works in the
    static book, where the ipywidgets explorer below shows only its saved state."""
    study = StudyFolder(study_dir)
    return HTML(explorer_html(explorer_data(study.models(study.main_split()))))


def explorer(study_dir: str | Path, n_images: int = 6):
    """ipywidgets: model, image, method, layer, class and opacity -> an overlay, computed live in
    Jupyter for any layer. The models are the main split's and the slices the split's (as in the map
    explorer); each model is offered only the methods it supports (CAM needs a pooling head). The
    book leaves it out: without a kernel it cannot change; ``map_explorer`` can."""
    study = StudyFolder(study_dir)
    runs = study.models(study.main_split()) if study.runs() else {}
    if not runs:
        return w.HTML("no finished runs in this study")
    models: dict[str, object] = {}
    paths = explorer_slices(runs, n_images // 2)  # the split's, as the map explorer above: no model chooses them
    model_w = w.Dropdown(options=[(title(a), a) for a in runs], description="model")
    image_w = w.Dropdown(options=[(Path(p).name, p) for p in paths], description="image")
    method_w = w.Dropdown(description="method")
    layer_w = w.Dropdown(options=["(auto)"], description="layer")
    class_w = w.ToggleButtons(options=list(CLASS_KEYS), description="class")
    alpha_w = w.FloatSlider(value=0.45, min=0, max=1, step=0.05, description="opacity")
    # An Image widget, not an Output widget: nbclient (papermill) can hang on an Output
    # widget's display/clear_output messages when no browser is attached (seen in CI).
    picture = w.Image(format="png", width=384)
    message = w.HTML()

    def model_for(name):
        if name not in models:
            models[name] = RunFolder(runs[name]).load_model()
        return models[name]

    def on_model(*_):
        model = model_for(model_w.value)
        method_w.options = supported_methods(model)
        method_w.value = "gradcam"
        layer_w.options = ["(auto)", *spatial_layers(model)[-12:]]

    def draw(*_):
        model = model_for(model_w.value)
        (img,), _ = RunFolder(runs[model_w.value]).slices([image_w.value])
        layer = None if layer_w.value == "(auto)" else layer_w.value
        try:
            heat = explain(model, img, method_w.value, layer=layer, class_name=class_w.value)[0]
        except Exception as exc:  # shown in the widget, not raised into the notebook; the old picture goes
            picture.value = b""
            message.value = f"cannot draw: {exc}"
            return
        rgb = overlay(img, heat, alpha_w.value)
        picture.value = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()
        message.value = f"{title(model_w.value)}: {method_w.value} for class {class_w.value}"

    model_w.observe(on_model, "value")
    on_model()
    for widget in (model_w, image_w, method_w, layer_w, class_w, alpha_w):
        widget.observe(draw, "value")
    draw()
    return w.VBox([w.HBox([model_w, image_w, method_w]), w.HBox([layer_w, class_w, alpha_w]), message, picture])


# --- finding a study ----------------------------------------------------------------------


def colab_defaults(preset: str, data: str | None) -> tuple[str, str | None]:
    """On Colab: the full dataset through kagglehub, and the paper preset on a GPU runtime.

    Every notebook calls this, so all five agree. An explicit ``data`` or ``$COVIDLIB_DATA``
    (a dataset on a mounted Drive, say) wins over the download.
    """
    if not in_colab():
        return preset, data
    preset = "paper" if gpus() and preset == "smoke" else preset
    data = data or os.environ.get("COVIDLIB_DATA") or str(fetch())
    print(f"Colab: preset {preset} ({'GPU' if gpus() else 'no GPU'}), data {data}")
    return preset, data


STUDY_ENV = "COVIDLIB_STUDY"


def _studies_near_here() -> list[Path]:
    """Study folders under ``studies/`` of the clone and of the working folder (and its parent,
    since JupyterLab starts a kernel in ``notebooks/``), newest first."""
    bases = [b for b in (repository_root(), Path.cwd(), Path.cwd().parent) if b is not None]
    found = {study.resolve() for b in bases for study in (b / "studies").glob("*") if StudyFolder(study).runs()}
    return sorted(found, key=lambda p: (p / "runs").stat().st_mtime, reverse=True)


def find_study(study_dir: str | Path | None = None, *, preset: str = "smoke", data: str | None = None,
               train_if_missing: bool = True) -> Path | None:
    """The study a report notebook shows.

    ``study_dir`` if given; else ``$COVIDLIB_STUDY``; else the newest study beside the clone or the
    working folder. With none, a small one (two models, both splits) is trained into
    ``studies/notebook`` here, so a notebook opened alone still runs; ``train_if_missing=False``
    returns None instead.
    """
    explicit = study_dir or os.environ.get(STUDY_ENV)
    if explicit:
        path = Path(explicit).expanduser().resolve()
        if not path.is_dir() or (train_if_missing and not StudyFolder(path).runs()):
            raise CovidlibError(f"{path} holds no finished runs; run `covidlib study --out {path}` first")
        return path
    near = _studies_near_here()
    if near:
        print(f"showing the study in {near[0]}")
        return near[0]
    if not train_if_missing:
        return None
    out = Path.cwd() / "studies" / "notebook"
    print(f"No study was found (looked for $COVIDLIB_STUDY and studies/ beside the clone and here), so this "
          f"notebook now trains a small one: {', '.join(QUICK_ARCHS)} at the {preset} preset on both splits, "
          f"into {out}. `covidlib study` trains all nine.", flush=True)
    return quick_study(out, preset=preset, data=data)


