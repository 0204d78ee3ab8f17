"""``covidlib evaluate | compare | baselines | explain``: flags over evaluate.py and explain.py."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from covidlib import CovidlibError
from covidlib.cli.options import seed
from covidlib.models.runs import RunFolder
from covidlib.paths import write_text_atomic
from covidlib.vocabulary import CLASS_KEYS, DEFAULT_SEED, SPLIT_KINDS


def add_parsers(sub) -> None:
    ev = sub.add_parser("evaluate", help="metrics with CIs for a run, on its test split or an external folder")
    ev.add_argument("--run", required=True, type=Path, help="a finished run folder")
    ev.add_argument("--data", help="external folder with COVID / non-COVID class folders (default: the run's test split)")
    ev.add_argument("--skip-bad", action="store_true", help="with --data: skip unreadable images instead of failing")
    ev.add_argument("--resamples", type=_resamples, default=1000, help="bootstrap resamples for the 95%% CIs")
    ev.add_argument("--json", type=Path, help="also write the result here")
    ev.add_argument("--card", type=Path, help="write the model card and CLAIM checklist (Markdown) here")
    ev.set_defaults(handler=run_evaluate)

    cp = sub.add_parser("compare", help="compare runs tested on one split: table, pairwise tests")
    cp.add_argument("runs", nargs="+", type=Path, help="finished run folders tested on the same split")
    cp.add_argument("--baselines", action="store_true", help="add the shortcut baselines on the same split")
    cp.add_argument("--resamples", type=_resamples, default=1000, help="bootstrap resamples for the 95%% CIs")
    cp.add_argument("--out", type=Path, default=Path("comparison"), help="folder for CSV, JSON and Markdown")
    cp.set_defaults(handler=run_compare)


    bl = sub.add_parser("baselines", help="shortcut baselines (size, histogram, nearest neighbour)")
    bl.add_argument("--data", help="dataset folder (default: $COVIDLIB_DATA, else the embedded sample)")
    bl.add_argument("--split", help="split CSV (default: the random split with --seed)")
    bl.add_argument("--kind", choices=SPLIT_KINDS, default="random", help="split kind for a new split (default random)")
    bl.add_argument("--seed", type=seed, default=DEFAULT_SEED, help=f"seed of the split (default {DEFAULT_SEED})")
    bl.add_argument("--skip-bad", action="store_true", help="skip unreadable images instead of failing")
    bl.set_defaults(handler=run_baselines)

    from covidlib.explain.maps import METHODS

    xp = sub.add_parser("explain", help="a CAM / saliency / per-layer map for one image, saved as PNG")
    xp.add_argument("--run", required=True, type=Path, help="a finished run folder")
    xp.add_argument("--image", required=True, type=Path, help="the CT slice to explain")
    xp.add_argument("--method", required=True, choices=METHODS, help="the map to draw")
    xp.add_argument("--layer", help="target layer (default: the last with spatial maps)")
    xp.add_argument("--class", dest="class_name", choices=list(CLASS_KEYS), default="covid",
                    help="the class whose evidence the map shows (default covid)")
    xp.add_argument("--alpha", type=float, default=0.45, help="overlay opacity")
    xp.add_argument("--out", required=True, type=Path, help="output PNG")
    xp.set_defaults(handler=run_explain)


def _resamples(text: str) -> int:
    """A bootstrap count: a whole number from 100 (coarser CIs are noise) to 100,000."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if not 100 <= n <= 100_000:
        raise argparse.ArgumentTypeError(f"must be between 100 and 100000, got {n}")
    return n


def run_evaluate(args: argparse.Namespace) -> None:
    from covidlib.evaluate.stats import evaluate_run

    result = evaluate_run(args.run, args.data, n_resamples=args.resamples, skip_bad=args.skip_bad)
    print(f"{args.run} on {result['evaluated_on']} ({result['n']} images, positive class COVID):")
    for name, v in result["metrics"].items():
        print(f"  {name:<12} {v['value']:.4f}  (95% CI {v['low']:.4f}-{v['high']:.4f})")
    print(f"  {'ECE':<12} {result['ece']:.4f}")
    if "youden" in result:
        y = result["youden"]
        print(f"  Youden threshold {y['threshold']:.3f} (chosen on validation): accuracy {y['metrics']['accuracy']:.4f}")
    if "image_sizes" in result:
        print(f"  image widths (min/q1/median/q3/max): external {result['image_sizes']['external']['width']}, "
              f"training {(result['image_sizes']['training_data'] or {}).get('width')}")
    if args.json:
        write_text_atomic(args.json, json.dumps(result, indent=2))
    if args.card:
        from covidlib.study.report import claim_checklist, model_card

        write_text_atomic(args.card, model_card(args.run, n_resamples=args.resamples) + "\n" + claim_checklist(args.run))


def run_compare(args: argparse.Namespace) -> None:
    from covidlib.evaluate.baselines import baselines_for_run
    from covidlib.evaluate.stats import compare_runs, load_run

    names, by_arch = {}, {}
    for run in args.runs:
        load_run(run)  # a finished run, or one line saying what is wrong with it
        name = RunFolder(run).config().arch
        by_arch.setdefault(name, []).append(run)
        names[name if name not in names else run.name] = run
    extra = None
    if args.baselines:
        extra = baselines_for_run(next(iter(names.values())))
    table, pairs = compare_runs(names, extra, n_resamples=args.resamples)  # refuses runs on other splits
    _print_seed_aggregates(by_arch)
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "table.csv")
    pairs.to_csv(args.out / "pairs.csv", index=False)
    write_text_atomic(args.out / "table.json", table.to_json(orient="index", indent=2))
    md = table[["accuracy", "accuracy_low", "accuracy_high", "auc", "auc_low", "auc_high"]].round(4).to_markdown()
    write_text_atomic(args.out / "table.md", md + "\n")
    print(md)
    print(f"wrote {args.out}/table.csv, table.json, table.md, pairs.csv")


def _print_seed_aggregates(by_arch: dict[str, list[Path]]) -> None:
    """Architectures with several runs (seeds): mean, sd and CI next to the paper's best-of-trials."""
    from covidlib.evaluate.stats import aggregate_seeds
    from covidlib.evaluate.tables import PAPER_TABLE

    for arch, runs in by_arch.items():
        if len(runs) < 2:
            continue
        agg = aggregate_seeds([RunFolder(r).metrics() for r in runs])
        a = agg.loc["accuracy"]
        paper = PAPER_TABLE["accuracy"].get(arch)
        print(f"{arch}: accuracy over {len(runs)} seeds {100 * a['mean']:.2f}% (sd {100 * a['std']:.2f}, "
              f"95% CI {100 * a['low']:.2f}-{100 * a['high']:.2f}; best {100 * a['best']:.2f}%)"
              + (f"; the paper's best of trials: {paper}%" if paper is not None else ""))


def run_baselines(args: argparse.Namespace) -> None:
    from covidlib.data.dataset import load_dataset
    from covidlib.data.splits import load_split, make_split
    from covidlib.evaluate.baselines import BASELINES, run_baselines
    from covidlib.evaluate.stats import bootstrap_ci
    from covidlib.paths import data_dir

    dataset = load_dataset(data_dir(args.data), skip_bad=args.skip_bad)
    split = load_split(args.split, dataset) if args.split else make_split(dataset, args.kind, seed=args.seed)
    preds = run_baselines(dataset, split, seed=args.seed)
    print(f"{'baseline':<18} {'accuracy':>9} {'95% CI':>15} {'AUC':>7}   features (positive class COVID)")
    for name, df in preds.items():
        ci = bootstrap_ci(df["y"], df["p_covid"])
        a = ci["accuracy"]
        print(f"{name:<18} {a['value']:>9.4f} {a['low']:>7.4f}-{a['high']:.4f} {ci['auc']['value']:>7.4f}   "
              f"{BASELINES[name][0]}")


def run_explain(args: argparse.Namespace) -> None:
    import cv2

    from covidlib.data.dataset import MIN_SIDE
    from covidlib.data.images import read_image
    from covidlib.explain.layers import activations, feature_grid, feature_map_layers, heatmap, overlay
    from covidlib.explain.maps import explain
    from covidlib.paths import atomic_path

    config = RunFolder(args.run).config()
    if not 0 <= args.alpha <= 1:
        raise CovidlibError(f"--alpha must be between 0 and 1, got {args.alpha}")
    if args.out.suffix.lower() != ".png":
        raise CovidlibError(f"--out {args.out}: the output must be a .png file")
    image = read_image(args.image, config.input_size, 1, config.resize, min_side=MIN_SIDE, lungs=config.lungs)
    model = RunFolder(args.run).load_model()
    if args.method in ("activations", "heatmaps"):
        layers = [args.layer] if args.layer else feature_map_layers(model)[:1]
        acts = activations(model, image, layers)[layers[0]]
        if args.method == "activations":
            rgb = cv2.cvtColor(feature_grid(acts), cv2.COLOR_GRAY2RGB)
        else:
            rgb = overlay(image, heatmap(acts, image.shape[:2]), args.alpha)
    else:
        heat = explain(model, image, args.method, layer=args.layer, class_name=args.class_name)[0]
        rgb = overlay(image, heat, args.alpha)
    with atomic_path(args.out, suffix=".png") as tmp:
        if not cv2.imwrite(str(tmp), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
            raise CovidlibError(f"could not write {args.out}")
    print(f"wrote {args.out} ({args.method}, {config.arch})")
