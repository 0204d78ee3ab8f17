"""Calibration beyond the reliability diagram: the Brier score, and temperature scaling fitted on
validation slices only (Guo et al. 2017), so a reader sees how much of a model's miscalibration one
scalar on its logit would remove. Nothing is fitted on the test slices."""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import expit, logit
from sklearn.metrics import brier_score_loss

_EPS = 1e-6


def brier(y_true, p_covid) -> float:
    """Mean squared difference between P(COVID) and the label (0 is perfect, 0.25 a constant 0.5)."""
    return float(brier_score_loss(np.asarray(y_true, int), np.asarray(p_covid, float)))


def scaled(p_covid, temperature: float) -> np.ndarray:
    """P(COVID) with its logit divided by ``temperature`` (above 1: less confident)."""
    return expit(logit(np.clip(np.asarray(p_covid, float), _EPS, 1 - _EPS)) / temperature)


def fit_temperature(y_val, p_val) -> float:
    """The temperature that minimises the validation slices' log loss (between 0.05 and 20)."""
    y, z = np.asarray(y_val, float), logit(np.clip(np.asarray(p_val, float), _EPS, 1 - _EPS))

    def nll(log_t: float) -> float:
        q = np.clip(expit(z / np.exp(log_t)), _EPS, 1 - _EPS)
        return float(-np.mean(y * np.log(q) + (1 - y) * np.log(1 - q)))

    return float(np.exp(minimize_scalar(nll, bounds=(np.log(0.05), np.log(20)), method="bounded").x))
