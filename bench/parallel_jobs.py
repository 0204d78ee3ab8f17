"""Training throughput of several training processes side by side against each one alone.

    python bench/parallel_jobs.py [--window 30] [--threads 0]

Why: a study runs ``jobs`` training notebooks at once; on a 2-core CPU that only pays where two
processes together do more work than one process with both cores. Each process trains one model on
random images (the ``cpu`` preset's input size and batch) with ``train_on_batch``; all of them count
the images they train within the same time window, after warm-up, so the overlap is exact. Printed:
each model's images per second alone and in the group, and the group's summed share of the alone
rates (above 100%: running them together is faster than one after another).
``--threads N`` sets TensorFlow's intra- and inter-op threads per process (0: TensorFlow's default).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import covidlib  # noqa: F401  (oneDNN flag before TensorFlow: imported after keras it is lost, 2x slower)

GROUPS = (("alexnet", "basic_cnn"), ("alexnet", "mobilenet"), ("alexnet", "basic_cnn", "mobilenet"))
SIZES = {"alexnet": (96, 32), "basic_cnn": (32, 128), "mobilenet": (64, 32)}  # the cpu preset's size, batch


def worker(arch: str, start: float, window: float) -> None:
    import keras
    import numpy as np

    from covidlib.models.architectures import build_model
    from covidlib.runtime import apply_policy, device_policy

    size, batch = SIZES[arch]
    apply_policy(device_policy(), 0)
    model = build_model(arch, input_size=size, weights="none", mode="scratch")
    x = np.random.default_rng(0).random((batch, size, size, 1)).astype("float32") * 255
    two = model.output_shape[-1] == 2
    y = keras.utils.to_categorical(np.arange(batch) % 2, 2) if two else (np.arange(batch) % 2).astype("float32")[:, None]
    model.compile(keras.optimizers.Adam(1e-3), "categorical_crossentropy" if two else "binary_crossentropy")
    while time.time() < start:  # warm-up (tracing) until every process is ready
        model.train_on_batch(x, y)
    n = 0
    while time.time() < start + window:
        model.train_on_batch(x, y)
        n += batch
    print(f"{arch} {n / window:.1f}", flush=True)


def rates(archs, window: float, threads: int) -> dict[str, float]:
    """Images per second of each of ``archs`` trained at once over the same window."""
    env = dict(os.environ)
    if threads:
        env.update(TF_NUM_INTRAOP_THREADS=str(threads), TF_NUM_INTEROP_THREADS=str(threads))
    start = time.time() + 40  # room for every process to import, build and trace
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", arch, str(start), str(window)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for arch in archs]
    out = {}
    for p in procs:
        arch, rate = p.communicate()[0].split()[-2:]
        out[arch] = float(rate)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--window", type=float, default=30)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker[0], float(args.worker[1]), float(args.worker[2]))
        return
    alone = {arch: rates([arch], args.window, 0)[arch] for arch in SIZES}  # the baseline: TensorFlow's threads
    print("alone (img/s): " + ", ".join(f"{a} {r:.0f}" for a, r in alone.items()))
    for group in GROUPS:
        together = rates(group, args.window, args.threads)
        share = sum(together[a] / alone[a] for a in group)
        print(" + ".join(f"{a} {together[a]:.0f} ({together[a] / alone[a]:.0%})" for a in group)
              + f"; together {share:.0%} of one at a time (threads {args.threads or 'default'})", flush=True)


if __name__ == "__main__":
    main()
