"""Does the `paper` preset run on this machine's accelerator? One short check per architecture.

    python bench/gpu_check.py [--data DIR] [--images 256] [--archs vgg16 ...] [--out gpu_check.json]

For each of the nine architectures, in a process of its own (a crash or out-of-memory in one
does not hide the others): the `paper` preset at its full input size with --weights none (no
download), two epochs on ``--images`` slices so that fine-tuned models also cross their unfreeze
(warm-up of one epoch), then one Grad-CAM map. Prints the devices, TensorFlow and Keras versions,
the device policy in force (precision, XLA, determinism, strategy), training images per second,
peak accelerator memory, and whether each step ran. Exits 1 if any architecture failed.

On Colab: Runtime > Change runtime type > GPU, then in a cell
    !git clone -q https://github.com/covidlib/covidlib && pip install -q ./covidlib
    !python covidlib/bench/gpu_check.py --out gpu_check.json
``--smoke`` shrinks inputs and images so the script itself can be tested on a CPU in seconds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARCHS = ("basic_cnn", "alexnet", "vgg16", "vgg19", "mobilenet", "resnet101", "resnet152", "densenet201", "inceptionv3")


def check_one(arch: str, data: str | None, images: int, smoke: bool) -> dict:
    """Train and explain one architecture in this process; every step's outcome in the result."""
    import covidlib  # noqa: F401  (quiet TensorFlow start, oneDNN flag)
    from covidlib.data.images import read_image
    from covidlib.explain.maps import explain
    from covidlib.models.architectures import ARCHITECTURES
    from covidlib.models.config import resolve
    from covidlib.models.runs import RunFolder
    from covidlib.models.train import train
    from covidlib.runtime import gpus, tf

    out: dict = {"arch": arch, "steps": {}}
    size = max(ARCHITECTURES[arch].min_size, 64) if smoke else None
    config = resolve(arch, "paper", data=data, weights="none", epochs=2, warmup_epochs=1, patience=2,
                     max_images=images, input_size=size, batch_size=16 if smoke else 32)
    out["input_size"], out["mode"] = config.input_size, config.mode
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        try:
            run = RunFolder(train(config, run_dir=Path(tmp) / arch))
            record = run.record()
            out["steps"]["train"] = "ok"
            out["device_policy"] = record["device"]
            out["train_images_per_second"] = record["train_images_per_second"]
            out["epochs_run"] = record["epochs_run"]
        except Exception as exc:  # reported, not raised: the next architecture still runs
            out["steps"]["train"] = f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            return out
        finally:
            out["seconds"] = round(time.perf_counter() - t0, 1)
        try:
            model = run.load_model()
            path = run.predictions()["path"].iloc[0]
            image = read_image(Path(record["data"]["root"]) / path, config.input_size)
            heat = explain(model, image, "gradcam")
            out["steps"]["gradcam"] = "ok" if heat.max() in (0.0, 1.0) and heat.shape[1:] == image.shape[:2] else "bad map"
            out["gradcam_blank"] = bool(heat.max() == 0)
        except Exception as exc:
            out["steps"]["gradcam"] = f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    if gpus():
        info = tf().config.experimental.get_memory_info("GPU:0")
        out["peak_gpu_memory_gb"] = round(info["peak"] / 2**30, 2)
    else:
        import resource

        out["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    return out


def environment() -> dict:
    import covidlib  # noqa: F401
    from covidlib.runtime import device_policy, tf, versions

    t = tf()
    return {"versions": versions(), "gpus": [d.name for d in t.config.list_physical_devices("GPU")],
            "gpu_details": [t.config.experimental.get_device_details(d) for d in t.config.list_physical_devices("GPU")],
            "device_policy": device_policy()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="dataset folder (default: $COVIDLIB_DATA, else the embedded sample)")
    p.add_argument("--images", type=int, default=256, help="slices per run (default 256)")
    p.add_argument("--archs", nargs="+", default=list(ARCHS), choices=ARCHS, help="architectures (default all nine)")
    p.add_argument("--smoke", action="store_true", help="tiny inputs and few images: test the script on a CPU")
    p.add_argument("--out", type=Path, help="also write the results here as JSON")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: check one architecture in this process
    args = p.parse_args()
    if args.one:
        print(json.dumps(check_one(args.one, args.data, args.images, args.smoke)))
        return 0
    env = environment()
    print(f"devices: {env['gpus'] or ['CPU only']}  policy: {env['device_policy']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if k in ("python", "tensorflow", "keras")))
    results = []
    for arch in args.archs:
        cmd = [sys.executable, __file__, "--one", arch, "--images", str(args.images)]
        cmd += ["--data", args.data] if args.data else []
        cmd += ["--smoke"] if args.smoke else []
        done = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
        result = json.loads(lines[-1]) if lines and done.returncode == 0 else {
            "arch": arch, "steps": {"process": f"FAILED: exit {done.returncode}: {done.stderr.strip()[-300:]}"}}
        results.append(result)
        ok = all(v == "ok" for v in result["steps"].values())
        memory = result.get("peak_gpu_memory_gb", result.get("peak_rss_gb", "?"))
        print(f"{arch:<12} {'ok    ' if ok else 'FAILED'} {result.get('input_size', '?')!s:>4} px "
              f"{result.get('mode', '?'):<9} {result.get('train_images_per_second', '?')!s:>7} img/s  "
              f"peak {memory} GB  {result['steps']}", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"environment": env, "results": results}, indent=2, default=str))
    failed = [r["arch"] for r in results if not all(v == "ok" for v in r["steps"].values())]
    print("all architectures ran" if not failed else f"FAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
