"""``covidlib train``: flags -> RunConfig -> train()."""

from __future__ import annotations

import argparse
from pathlib import Path

from covidlib.cli.options import seed
from covidlib.data.lungs import LUNG_VIEWS
from covidlib.models.architectures import ARCHITECTURES, LOSSES, MODES
from covidlib.models.config import PRESETS, resolve
from covidlib.vocabulary import DEFAULT_SEED, SPLIT_KINDS


def _choice(valid, what: str):
    def check(value: str) -> str:
        if value not in valid:
            raise argparse.ArgumentTypeError(f"unknown {what} {value!r}; valid: {', '.join(valid)}")
        return value

    return check


def add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="train one architecture into a run folder")
    def choices(valid) -> str:
        return "{" + ",".join(valid) + "}"

    p.add_argument("--arch", required=True, type=_choice(list(ARCHITECTURES), "architecture"),
                   metavar=choices(ARCHITECTURES), help="the architecture to train")
    p.add_argument("--preset", default="smoke", help=f"{', '.join(PRESETS)}, or a YAML file (default smoke)")
    p.add_argument("--data", help="dataset folder (default: $COVIDLIB_DATA, else the embedded sample)")
    p.add_argument("--split", help="split CSV from `covidlib data split` (default: a new one in the run folder)")
    p.add_argument("--split-kind", type=_choice(SPLIT_KINDS, "split kind"), metavar=choices(SPLIT_KINDS),
                   help="for a new split: random (the paper's) or scan (segments of consecutively numbered look-alike "
                        "slices, a scan proxy, kept together)")
    p.add_argument("--seed", type=seed, help=f"seed for the split, initial weights and batch order (default {DEFAULT_SEED})")
    p.add_argument("--backbone-seed", type=seed,
                   help="draw of a random frozen backbone (default: --seed; a study's seeds share its main seed's)")
    p.add_argument("--weights", help="none, imagenet (needs the internet once), or a weights file")
    p.add_argument("--mode", type=_choice(MODES, "mode"), metavar=choices(MODES),
                   help="scratch: train everything; frozen: train a head on fixed features; "
                        "finetune: head first, then the top of the backbone")
    p.add_argument("--input-size", type=int, help="square input side in pixels (default: the paper's)")
    p.add_argument("--batch-size", type=int, help="images per training step")
    p.add_argument("--epochs", type=int, help="most epochs to train (early stopping may end sooner)")
    p.add_argument("--learning-rate", type=float, help="Adam learning rate")
    p.add_argument("--dropout", type=float, help="dropout rate before the classifier head")
    p.add_argument("--loss", type=_choice(LOSSES, "loss"), metavar=choices(LOSSES),
                   help="head and loss (default: the paper's for the architecture)")
    p.add_argument("--patience", type=int, help="epochs without a better validation loss before stopping")
    p.add_argument("--max-images", type=int, help="train on a stratified subsample of this many images")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="random flips, shifts and zoom on training images")
    p.add_argument("--lungs", type=_choice(LUNG_VIEWS, "lung view"), metavar=choices(LUNG_VIEWS),
                   help="whole slices (default), no_lungs: the lung fields blacked out, lungs_only: all but them")
    p.add_argument("--skip-bad", action="store_true", default=None,
                   help="skip unreadable images (recorded in run.json) instead of failing")
    p.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=None,
                   help="deterministic ops (default: on a CPU yes, on a GPU no; on a GPU it also turns XLA off)")
    p.add_argument("--mixed-precision", action=argparse.BooleanOptionalAction, default=None,
                   help="float16 compute with a float32 head (default: on a GPU only)")
    p.add_argument("--out", type=Path, help="run folder (default runs/ARCH-MODE-SPLIT-seedN)")
    p.add_argument("--resume", action="store_true", help="continue a killed run from its last checkpoint")
    p.set_defaults(handler=run_train)


def run_train(args: argparse.Namespace) -> None:
    from covidlib.models.train import train

    overrides = {k: getattr(args, k) for k in ("data", "split", "split_kind", "seed", "backbone_seed", "weights", "mode", "input_size",
                                               "batch_size", "epochs", "learning_rate", "dropout", "loss", "patience",
                                               "max_images", "augment", "lungs", "skip_bad", "deterministic",
                                               "mixed_precision")}
    overrides["out"] = str(args.out) if args.out else None
    config = resolve(args.arch, args.preset, **overrides)
    train(config, resume=args.resume)
