"""Plotly figures shared by the notebooks, the book and the CLI. Each takes plain data."""

from __future__ import annotations

import base64
import html

import cv2
import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots
from sklearn.calibration import calibration_curve
from sklearn.metrics import auc, precision_recall_curve, roc_curve

COVID_NOTE = "positive class: COVID"



def learning_curves(history: pd.DataFrame, title: str = "Learning curves"):
    fig = go.Figure()
    for col in [c for c in history.columns if c in ("loss", "val_loss", "accuracy", "val_accuracy")]:
        fig.add_scatter(x=history["epoch"], y=history[col], mode="lines+markers", name=col,
                        yaxis="y2" if "accuracy" in col else "y")
    fig.update_layout(title=title, xaxis_title="epoch", yaxis_title="loss",
                      yaxis2=dict(title="accuracy", overlaying="y", side="right", range=[0, 1]), height=380)
    return fig


def confusion_matrix(confusion: dict, title: str = "Confusion matrix"):
    z = [[confusion["tp"], confusion["fn"]], [confusion["fp"], confusion["tn"]]]
    fig = go.Figure(go.Heatmap(z=z, x=["predicted COVID", "predicted non-COVID"], y=["COVID", "non-COVID"],
                               text=z, texttemplate="%{text}", colorscale="Blues", showscale=False))
    fig.update_layout(title=f"{title} ({COVID_NOTE})", yaxis=dict(autorange="reversed"), height=340, width=460)
    return fig


def roc_pr(curves: dict[str, pd.DataFrame], title: str = "ROC and precision-recall"):
    """``curves``: name -> DataFrame(y, p_covid)."""
    fig = make_subplots(1, 2, subplot_titles=("ROC", "precision-recall"))
    for name, df in curves.items():
        fpr, tpr, _ = roc_curve(df["y"], df["p_covid"])
        prec, rec, _ = precision_recall_curve(df["y"], df["p_covid"])
        fig.add_scatter(x=fpr, y=tpr, name=f"{name} (AUC {auc(fpr, tpr):.3f})", mode="lines", row=1, col=1)
        fig.add_scatter(x=rec, y=prec, name=name, mode="lines", showlegend=False, row=1, col=2)
    fig.update_xaxes(title_text="1 - specificity", row=1, col=1)
    fig.update_yaxes(title_text="sensitivity", row=1, col=1)
    fig.update_xaxes(title_text="recall", row=1, col=2)
    fig.update_yaxes(title_text="precision", row=1, col=2)
    fig.update_layout(title=f"{title} ({COVID_NOTE})", height=400)
    return fig


def reliability(curves: dict[str, pd.DataFrame], n_bins: int = 10, title: str = "Reliability diagram"):

    fig = go.Figure()
    fig.add_scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dash", color="grey"), name="perfect")
    for name, df in curves.items():
        frac, mean = calibration_curve(df["y"], df["p_covid"], n_bins=n_bins)
        fig.add_scatter(x=mean, y=frac, mode="lines+markers", name=name)
    fig.update_layout(title=title, xaxis_title="predicted P(COVID)", yaxis_title="observed COVID fraction", height=400)
    return fig


def metric_table_figure(table: pd.DataFrame, metric: str = "accuracy", title: str | None = None):
    """Point and 95% CI per model (rows of ``table``, indexed by the names to show, with columns metric,
    metric_low, metric_high)."""
    t = table.sort_values(metric)
    fig = go.Figure(go.Scatter(
        x=t[metric], y=list(t.index), mode="markers",
        error_x=dict(type="data", symmetric=False, array=t[f"{metric}_high"] - t[metric],
                     arrayminus=t[metric] - t[f"{metric}_low"])))
    fig.update_layout(title=title or f"Test {metric} with 95% bootstrap CI ({COVID_NOTE})", xaxis_title=metric,
                      height=120 + 28 * len(t))
    return fig


def grouped_bars(labels: list[str], columns: dict[str, list[float]], title: str, range_y=None):
    """One group of bars per label, one bar per column (e.g. a model's accuracy on each split)."""
    fig = go.Figure()
    for name, values in columns.items():
        fig.add_bar(x=labels, y=list(values), name=name)
    fig.update_layout(barmode="group", title=title, yaxis_range=list(range_y) if range_y else None)
    return fig


def pvalue_matrix(pairs: pd.DataFrame, column: str = "mcnemar_p_holm", title: str = "Pairwise tests"):
    names = list(dict.fromkeys([*pairs["a"], *pairs["b"]]))
    m = pd.DataFrame(np.nan, index=names, columns=names)
    for _, r in pairs.iterrows():
        m.loc[r["a"], r["b"]] = m.loc[r["b"], r["a"]] = r[column]
    fig = go.Figure(go.Heatmap(z=m.values, x=names, y=names, zmin=0, zmax=1, colorscale="Viridis_r",
                               text=np.round(m.values, 3), texttemplate="%{text}"))
    fig.update_layout(title=f"{title}: {column} (Holm-corrected)", height=160 + 30 * len(names))
    return fig


def png_source(image) -> str:
    """An image (grey or RGB uint8, or nested lists of them) as a PNG data URI: what a plotly Image
    trace shows from ``source``, far smaller in a page than its pixels as JSON numbers."""
    img = np.asarray(image, np.uint8)
    if img.ndim == 3 and (img == img[..., :1]).all():  # a grey slice repeated as RGB: a third of the bytes
        img = img[..., 0]
    ok, png = cv2.imencode(".png", img[..., ::-1] if img.ndim == 3 and img.shape[-1] == 3 else img,
                           [cv2.IMWRITE_PNG_COMPRESSION, 9])
    return "data:image/png;base64," + base64.b64encode(png.tobytes()).decode()


def image_grid(images: list[np.ndarray], captions: list[str], colours: list[str] | None = None, cols: int = 4,
               title: str = ""):
    """Images (grey or RGB uint8) in a grid with coloured captions (figures 13-15). Captions are plain
    text: plotly reads annotation text as HTML, and a caption is often a file name."""

    rows = int(np.ceil(len(images) / cols))
    fig = make_subplots(rows, cols, subplot_titles=[html.escape(str(c)) for c in captions], horizontal_spacing=0.02, vertical_spacing=0.08)
    for k, img in enumerate(images):
        img = np.asarray(img)
        rgb = np.repeat(img[..., :1] if img.ndim == 3 else img[..., None], 3, axis=-1) if img.ndim == 2 or img.shape[-1] == 1 else img
        fig.add_trace(go.Image(source=png_source(rgb)), row=k // cols + 1, col=k % cols + 1)
    for k, ann in enumerate(fig.layout.annotations):
        if colours:
            ann.font = dict(color=colours[k], size=11)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    fig.update_layout(title=title, height=240 * rows + 60, margin=dict(l=10, r=10, t=70, b=10))
    return fig


def prediction_grid(images, y_true, p_covid, cols: int = 4, title: str = "Test predictions"):
    """'predicted (true)' with P(COVID), green when right and red when wrong."""
    names = {1: "COVID", 0: "non-COVID"}
    captions, colours = [], []
    for y, p in zip(y_true, p_covid):
        pred = int(p >= 0.5)
        captions.append(f"{names[pred]} ({names[int(y)]}) p={p:.2f}")
        colours.append("green" if pred == int(y) else "red")
    return image_grid(list(images), captions, colours, cols=cols, title=title)


def cost_vs_accuracy(table: pd.DataFrame, x: str = "train_seconds", y: str = "accuracy"):
    fig = go.Figure(go.Scatter(x=table[x], y=table[y], text=list(table.index), mode="markers+text",
                               textposition="top center"))
    labels = {"train_seconds": "training time (s, log scale)", "accuracy": "test accuracy"}
    fig.update_layout(title=f"{labels.get(y, y)} against {labels.get(x, x)}", xaxis_title=labels.get(x, x),
                      yaxis_title=labels.get(y, y), xaxis_type="log", height=420)
    return fig
