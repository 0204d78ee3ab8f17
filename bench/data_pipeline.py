"""Images per second delivered per epoch at 224x224: decoding PNGs every epoch vs our cache.

    python bench/data_pipeline.py [--data DIR] [--size 224] [--epochs 3]

(a) is the paper's approach (Keras ImageDataGenerator; its Keras 3 equivalent
``keras.utils.image_dataset_from_directory``), which decodes and resizes every PNG in
every epoch. (b) is covidlib: decode once into a uint8 cache, then a tf.data pipeline
over it. Epoch 1 is a warm-up for both; the rate is the mean over the later epochs.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import covidlib  # noqa: F401  (sets the oneDNN flag before TensorFlow loads)
from covidlib.data.dataset import load_dataset
from covidlib.data.images import decoded, take, tf_dataset
from covidlib.paths import data_dir


def rate(make_ds, epochs: int) -> float:
    times = []
    for _ in range(epochs):
        t0, n = time.perf_counter(), 0
        for x, _ in make_ds():
            n += int(x.shape[0])
        times.append((time.perf_counter() - t0, n))
    later = times[1:] or times
    return sum(n for _, n in later) / sum(t for t, _ in later)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    import keras

    root = data_dir(args.data)
    ds = load_dataset(root)
    print(f"data: {root} ({len(ds.manifest)} images), size {args.size}, batch {args.batch}, cpus {os.cpu_count()}")

    paper = keras.utils.image_dataset_from_directory(
        root, labels="inferred", label_mode="binary", color_mode="rgb", batch_size=args.batch,
        image_size=(args.size, args.size), shuffle=True, seed=0, verbose=False)
    a = rate(lambda: paper, args.epochs)
    print(f"(a) decode every epoch (image_dataset_from_directory): {a:8.1f} img/s")

    os.environ.setdefault("COVIDLIB_CACHE", tempfile.mkdtemp(prefix="covidlib-bench-"))
    t0 = time.perf_counter()
    cache = decoded(ds, args.size)
    build = time.perf_counter() - t0
    images, labels = take(cache, cache.paths)
    b = rate(lambda: tf_dataset(images, labels, batch_size=args.batch, shuffle=True, seed=0), args.epochs)
    print(f"(b) covidlib decode cache + tf.data:                  {b:8.1f} img/s "
          f"(one-off cache build {build:.1f} s, {images.nbytes / 2**20:.0f} MiB uint8)")
    print(f"ratio: {b / a:.1f}")


if __name__ == "__main__":
    main()
