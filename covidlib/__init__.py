"""covidlib: a reproducible case study of CNNs for COVID-19 detection on lung CT slices.

Importing covidlib never imports TensorFlow; modules that need it call
:func:`covidlib.runtime.tf` so that the CPU speed flags are set first.
"""

from __future__ import annotations

import os

# oneDNN doubles conv/matmul throughput on the AMD CPUs we measured, but TensorFlow only
# reads the flag at import time, so it must be set before anything imports TensorFlow.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from covidlib import _quiet  # noqa: E402  (after the flags above, before anything imports TensorFlow)

_quiet.install()

__version__ = "0.1.0"


class CovidlibError(Exception):
    """An error caused by the user's input; the CLI prints it as one line and exits 2."""


__all__ = ["CovidlibError", "__version__"]
