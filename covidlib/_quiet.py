"""Keep TensorFlow's native start-up lines off stderr (``COVIDLIB_TF_LOGS=1`` keeps them).

TensorFlow writes ``I0000 ... oneDNN custom operations are on``, ``Could not find cuda drivers``
and ``failed call to cuInit`` from C++ before absl logging is set up, so TF_CPP_MIN_LOG_LEVEL
cannot hide them (measured with TF 2.21). They would come before every one-line error of the
CLI and fill notebook cells. The first ``import tensorflow`` (from anywhere: keras, a notebook)
and its device discovery run with file descriptor 2 pointed at /dev/null, then it is restored.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def native_stderr_silenced() -> Iterator[None]:
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable fd 2: nothing to silence
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class _QuietLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        with native_stderr_silenced():
            self.loader.exec_module(module)
            module.config.list_physical_devices()  # device discovery logs (cuInit) come here


class _QuietTensorFlowFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)  # once: the real finders do the work
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


def install() -> None:
    if "tensorflow" in sys.modules or os.environ.get("COVIDLIB_TF_LOGS"):
        return
    if not any(isinstance(f, _QuietTensorFlowFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietTensorFlowFinder())
