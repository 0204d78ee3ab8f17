"""covidlib publish's compaction and the README's findings block, on notebooks with known outputs (the
whole publish of a smoke study, and the strict build of a checkout, are in test_study.py)."""

from __future__ import annotations

import base64
import json
import re

import cv2
import numpy as np
import plotly.graph_objects as go
import pytest

from covidlib import CovidlibError
from covidlib.study.publish import (
    FINDINGS_END,
    FINDINGS_START,
    PLOTLY_MIME,
    WIDGET_MIME,
    compact,
    machine_paths,
    write_findings,
)


def _notebook(tmp_path, pixels: np.ndarray):
    figure = json.loads(go.Figure(go.Image(z=np.repeat(pixels[..., None], 3, axis=-1))).to_json())
    outputs = [
        {"output_type": "display_data", "metadata": {}, "data": {PLOTLY_MIME: figure, "text/html": "<div>old</div>"}},
        {"output_type": "display_data", "metadata": {"scrapbook": {"name": "fig"}},
         "data": {f"application/papermill.record/{PLOTLY_MIME}": figure}},
        {"output_type": "stream", "name": "stderr", "text": "W0000 a native log line\n"},
        {"output_type": "display_data", "metadata": {}, "data": {WIDGET_MIME: {"model_id": "x"}}},
        {"output_type": "stream", "name": "stdout", "text": "read /work/studies/cpu/runs/a and /work/data/sarscov2-ct/x.png\n"},
    ]
    injected = {"cell_type": "code", "source": 'data = "/work/data/x"', "outputs": [],
                "metadata": {"tags": ["injected-parameters"]}}
    nb = {"cells": [{"cell_type": "code", "source": "", "metadata": {}, "outputs": outputs}, injected],
          "metadata": {"widgets": {"state": {}}, "papermill": {"input_path": "/work/x.ipynb"}},
          "nbformat": 4, "nbformat_minor": 5}
    path = tmp_path / "n.ipynb"
    path.write_text(json.dumps(nb))
    return path


def test_compact_keeps_one_html_figure_with_the_same_pixels_as_png_and_drops_logs_widgets_and_paths(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (40, 50), dtype=np.uint8)
    path = _notebook(tmp_path, pixels)
    compact(path, {"/work/studies/cpu": "STUDY", "/work/data/sarscov2-ct": "sarscov2-ct"})
    nb = json.loads(path.read_text())
    outputs = nb["cells"][0]["outputs"]
    assert [o.get("name", o["output_type"]) for o in outputs] == ["display_data", "display_data", "stdout"]
    assert not any(k.endswith(PLOTLY_MIME) for o in outputs for k in o.get("data", {})) and "widgets" not in nb["metadata"]
    assert len(nb["cells"]) == 1 and "papermill" not in nb["metadata"]  # the injected parameters named paths
    html = outputs[1]["data"]["application/papermill.record/text/html"]
    assert "<div>old</div>" != outputs[0]["data"]["text/html"]
    html = html.replace("\\u002f", "/")  # plotly escapes every "/" in the page, base64's too
    png = re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)", html).group(1)
    shown = cv2.imdecode(np.frombuffer(base64.b64decode(png), np.uint8), cv2.IMREAD_UNCHANGED)
    assert shown.shape == pixels.shape and (shown == pixels).all()  # one grey channel, the same values
    assert '"z"' not in html.split("Plotly.newPlot", 1)[1]
    assert outputs[2]["text"] == "read STUDY/runs/a and sarscov2-ct/x.png\n" and not machine_paths(tmp_path)


def test_the_findings_block_is_rewritten_from_glued_sentences_and_only_between_its_markers(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    glued = {"comparison": {"table1_sentence": "Like for like: 96.0."},
             "dataset": {"scan_sentence": "257 segments."},
             "validity": {"drop_sentence": "+1.0 points.", "fold_sentence": "Over 5 folds.",
                          "masked_sentence": "Chance is about 50%.", "external_sentence": "On the external test."}}
    for name, values in glued.items():
        outputs = [{"output_type": "display_data", "metadata": {"scrapbook": {"name": k}},
                    "data": {"application/papermill.record/text/plain": repr(v)}} for k, v in values.items()]
        (results / f"{name}.ipynb").write_text(json.dumps({"cells": [{"cell_type": "code", "outputs": outputs}]}))
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{FINDINGS_START}\n- old\n{FINDINGS_END}\nafter\n")
    write_findings(readme, results)
    text = readme.read_text()
    assert text.startswith("# x\n\nbefore\n") and text.endswith(f"{FINDINGS_END}\nafter\n") and "- old" not in text
    assert "- **Reproduction.** Like for like: 96.0. ([chapter](book/results.md))" in text
    assert "- **Outside the lungs.** Chance is about 50%. ([chapter](book/validity.md))" in text
    assert text.count("\n- **") == 6
    readme.write_text("# no markers\n")
    with pytest.raises(CovidlibError, match="has no findings block"):
        write_findings(readme, results)
