"""Training throughput per architecture: a paper-style pipeline against covidlib's.

    python bench/train.py [--data DIR] [--preset cpu] [--archs basic_cnn alexnet ...] [--images 256]

(a) paper-style: PNGs decoded and resized every epoch; in frozen mode ``model.fit`` on the
    whole model with the backbone frozen, so the backbone runs over every image in every
    epoch (what ImageDataGenerator + a frozen Keras model does).
(b) covidlib: the uint8 decode cache; in frozen mode the head trains on cached features.
Both train the same model for one epoch over the same ``--images`` real slices, after a
warm-up epoch (tracing excluded). Seconds per epoch are scaled to the full training
split (1785 images on the real data's 80/20 split with 10% validation).

It also prints each forward pass's achieved GFLOP/s against this machine's float32
matmul rate (tf.matmul, 2048x2048), measured in the same run.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

import covidlib  # noqa: F401  (oneDNN flag before TensorFlow)
from covidlib.data.dataset import load_dataset
from covidlib.data.images import decoded
from covidlib.models.architectures import build_model
from covidlib.models.config import Preset, resolve
from covidlib.models.contract import count_flops, feature_model, head_model, loss_and_target
from covidlib.paths import data_dir
from covidlib.runtime import tf

FULL_TRAIN = 1785


def matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
    t = tf()
    a = t.random.normal((n, n))
    b = t.random.normal((n, n))
    (a @ b).numpy()
    t0 = time.perf_counter()
    for _ in range(repeats):
        c = a @ b
    c.numpy()
    return 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e9


def timed_epoch(fn) -> float:
    fn()  # warm-up: tracing and first-call costs
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_arch(arch: str, preset: str, ds, pick, paths, labels, peak: float) -> None:
    import keras

    t = tf()
    cfg = resolve(arch, preset)
    size, frozen = cfg.input_size, cfg.mode == "frozen"
    keras.utils.set_random_seed(0)
    model = build_model(arch, input_size=size, weights="none", mode=cfg.mode, loss=cfg.loss)
    loss, target = loss_and_target(cfg.loss)
    y = t.one_hot(labels, 2) if target == "onehot" else labels.astype("float32")[:, None] if target == "binary" else labels

    def decode(path):
        img = t.io.decode_png(t.io.read_file(path), channels=1)
        return t.image.resize(t.cast(img, t.float32), (size, size))

    paper_ds = t.data.Dataset.from_tensor_slices((paths, y)).map(
        lambda p, lab: (decode(p), lab), num_parallel_calls=t.data.AUTOTUNE).batch(cfg.batch_size).prefetch(2)
    cache = np.asarray(decoded(ds, size).images[pick])
    ours_ds = t.data.Dataset.from_tensor_slices((cache, y)).batch(cfg.batch_size).map(
        lambda x, lab: (t.cast(x, t.float32), lab)).prefetch(2)
    if frozen:
        extractor = feature_model(model)
        head = head_model(model, extractor.output_shape[-1])
        head.compile(keras.optimizers.Adam(cfg.learning_rate), loss)
        feats = extractor.predict(ours_ds.map(lambda x, lab: x), verbose=0)
        feat_ds = t.data.Dataset.from_tensor_slices((feats, y)).batch(cfg.batch_size).prefetch(2)

        def ours_epoch():
            head.fit(feat_ds, epochs=1, verbose=0)
    else:
        def ours_epoch():
            model.fit(ours_ds, epochs=1, verbose=0)

    model.compile(keras.optimizers.Adam(cfg.learning_rate), loss)

    def paper_epoch():  # in frozen mode the backbone is frozen, but still runs over every image
        model.fit(paper_ds, epochs=1, verbose=0)

    sa, sb = timed_epoch(paper_epoch), timed_epoch(ours_epoch)
    n = len(pick)
    fwd = timed_epoch(lambda: model.predict(ours_ds.map(lambda x, lab: x), verbose=0))
    flops = count_flops(model)
    achieved = flops * n / fwd / 1e9
    print(f"{arch:<12} {size:>4} {cfg.mode:<8} {n / sa:>10.1f} {n / sb:>10.1f} {sa * FULL_TRAIN / n:>9.1f} "
          f"{sb * FULL_TRAIN / n:>9.2f} {sa / sb:>7.1f} {flops / 1e9:>9.3f} {achieved:>11.1f} {achieved / peak:>7.0%}")
    print(f"ratio: {sa / sb:.1f} ({arch})", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data")
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--archs", nargs="*")
    ap.add_argument("--images", type=int, default=256)
    args = ap.parse_args()
    import keras

    ds = load_dataset(data_dir(args.data))
    rng = np.random.default_rng(0)
    pick = np.sort(rng.choice(len(ds.manifest), min(args.images, len(ds.manifest)), replace=False))
    paths = [str(p) for p in np.array(ds.abs_paths(), dtype=object)[pick]]
    labels = ds.labels[pick]
    peak = matmul_gflops()
    print(f"data {ds.root}: {len(pick)} images per timed epoch; float32 matmul peak {peak:.0f} GFLOP/s")
    print(f"{'arch':<12} {'size':>4} {'mode':<8} {'(a) img/s':>10} {'(b) img/s':>10} {'(a) s/ep':>9} "
          f"{'(b) s/ep':>9} {'ratio':>7} {'GFLOP/img':>9} {'fwd GFLOP/s':>11} {'of peak':>7}")
    for arch in args.archs or Preset.load(args.preset).archs:
        bench_arch(arch, args.preset, ds, pick, paths, labels, peak)
        keras.backend.clear_session()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory():
        main()
