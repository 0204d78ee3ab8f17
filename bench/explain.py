"""Grad-CAM latency per architecture, for one 224x224 image on this CPU, after the first call.

    python bench/explain.py [--archs ...] [--size 224] [--repeats 5]

The gradient function is traced once per (model, layer, class) with tf.function and then
reused; the first call (tracing) is printed separately. The baseline in the same run is
an untraced eager GradientTape pass (what a notebook would write by hand), so the
ratio shows what tracing buys.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import covidlib  # noqa: F401  (oneDNN flag before TensorFlow)
from covidlib.explain.maps import _Forward, find_target_layer, gradcam
from covidlib.models.architectures import ARCHITECTURES, build_model
from covidlib.models.contract import class_score
from covidlib.runtime import tf


def eager_gradcam(model, x, layer):
    t = tf()
    forward = _Forward(model, [layer])
    with t.GradientTape() as tape:
        (act,), out = forward(t.constant(x))
        score = class_score(out, 1)
    return tape.gradient(score, act)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", nargs="*", default=list(ARCHITECTURES))
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    import keras

    print(f"{'arch':<12} {'size':>4} {'first call s':>12} {'traced s':>9} {'eager s':>8} {'ratio':>6}")
    for arch in args.archs:
        size = args.size if ARCHITECTURES[arch].backbone else ARCHITECTURES[arch].input_size
        model = build_model(arch, input_size=size)
        x = np.random.default_rng(0).uniform(0, 255, (1, size, size, 1)).astype(np.float32)
        layer = find_target_layer(model)
        t0 = time.perf_counter()
        gradcam(model, x, layer=layer)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            gradcam(model, x, layer=layer)
        traced = (time.perf_counter() - t0) / args.repeats
        eager_gradcam(model, x, layer)
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            eager_gradcam(model, x, layer)
        eager = (time.perf_counter() - t0) / args.repeats
        print(f"{arch:<12} {size:>4} {first:>12.2f} {traced:>9.3f} {eager:>8.3f} {eager / traced:>6.1f}", flush=True)
        print(f"ratio: {eager / traced:.1f} ({arch})", flush=True)
        keras.backend.clear_session()


if __name__ == "__main__":
    main()
