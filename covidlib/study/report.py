"""A model card (Mitchell et al. 2019) and a CLAIM 2024 checklist, filled from a run's own facts."""

from __future__ import annotations

import datetime
from pathlib import Path

from covidlib.evaluate.stats import evaluate_run, load_run
from covidlib.models.architectures import architecture
from covidlib.models.config import RunConfig
from covidlib.models.runs import RunFolder, finished_runs
from covidlib.paths import git_commit
from covidlib.study.folder import StudyFolder

DATASET = ("SARS-CoV-2 CT-scan dataset (Soares et al., medRxiv 2020, doi:10.1101/2020.04.24.20078584; "
           "Kaggle plameneduardo/sarscov2-ctscan-dataset), CC BY-NC-SA 4.0")


def _fmt(ci: dict) -> str:
    return f"{100 * ci['value']:.1f}% (95% CI {100 * ci['low']:.1f}-{100 * ci['high']:.1f})"


def _how_trained(cfg: RunConfig) -> str:
    """``trained from scratch``, ``a frozen random backbone``, ``fine-tuned from imagenet weights``."""
    if cfg.mode == "scratch":
        return "trained from scratch"
    source = "a random backbone" if cfg.weights == "none" else f"{cfg.weights} weights"
    return f"frozen, {source}" if cfg.mode == "frozen" else f"fine-tuned from {source}"


def model_card(run: str | Path, *, n_resamples: int = 1000) -> str:
    record, _ = load_run(run)
    cfg, data, split = RunFolder(run).config(), record["data"], record["split"]
    arch = architecture(cfg.arch)
    ev = evaluate_run(run, n_resamples=n_resamples)
    m = ev["metrics"]
    leak = split.get("near_duplicates", {})
    lines = [
        f"# Model card: {arch.title} ({_how_trained(cfg)}, seed {cfg.seed})",
        "",
        "## Model details",
        f"- Architecture: {arch.title}, input {cfg.input_size}x{cfg.input_size} grey slices, "
        f"{record['parameters']:,} parameters, {cfg.loss} cross-entropy, Adam (lr {cfg.learning_rate}).",
        f"- Trained by covidlib {record['versions'].get('covidlib', '?')} with TensorFlow "
        f"{record['versions'].get('tensorflow', '?')} / Keras {record['versions'].get('keras', '?')}; "
        f"{record['epochs_run']} epochs (best {record['best_epoch']}), {record['train_seconds']:.0f} s of training.",
        "",
        "## Intended use",
        "- Research and teaching only: reproducing and stress-testing a published comparison of CNNs.",
        "- **Not for clinical use.** It has not been validated for diagnosis, triage or any patient decision.",
        "",
        "## Factors",
        "- Single axial CT slices from one source (hospitals in São Paulo, Brazil); no patient, scanner or "
        "demographic information exists in the data, so performance across these factors is unknown.",
        "",
        "## Metrics (positive class: COVID; threshold 0.5)",
        *(f"- {k}: {_fmt(v)}" for k, v in m.items()),
        f"- expected calibration error: {ev['ece']:.3f}",
    ]
    if "youden" in ev:
        y = ev["youden"]
        lines.append(f"- at the Youden threshold {y['threshold']:.3f} (chosen on validation): accuracy "
                     f"{100 * y['metrics']['accuracy']:.1f}%, sensitivity {100 * y['metrics']['recall']:.1f}%, "
                     f"specificity {100 * y['metrics']['specificity']:.1f}%")
    lines += [
        "",
        "## Evaluation data",
        f"- {split['sizes']['test']} test slices from a `{split.get('kind', '?')}` split (seed {split.get('seed', '?')})"
        + (f", from {ev['units']} scans (the unit its intervals resample)." if ev["resampled"] == "scans" else "."),
        f"- In the split file it drew from, {leak.get('with_train_near_duplicate', '?')} of "
        f"{leak.get('test_images', '?')} test slices ({100 * leak.get('fraction', float('nan')):.1f}%) have a "
        "near-duplicate among the training slices"
        + (f", and {scan['within_1']} ({100 * scan['fraction_within_1']:.1f}%) a same-class slice one file number away."
           if (scan := split.get("scan_neighbours")) else "."),
        "",
        "## Training data",
        f"- {DATASET}; {data['images']} slices, manifest hash `{data['manifest_hash'][:16]}`; "
        f"{split['sizes']['train']} train, {split['sizes']['val']} validation slices.",
        "",
        "## Caveats and recommendations",
        "- Slices, not patients: without patient IDs, a random split puts near-copies of test slices in train "
        "and inflates every metric; compare with the scan split.",
        "- Image size and intensity differ between the classes; see the shortcut baselines before reading "
        "accuracy as evidence that the model sees lung disease.",
        "- One dataset, one site, no external test by default; confidence intervals cover resampling of this "
        "test set only, not a new hospital.",
    ]
    return "\n".join(lines) + "\n"


def claim_checklist(run: str | Path, external: str | Path | None = None) -> str:
    """The CLAIM 2024 items this project can answer from the run's own record; ``external`` is the
    folder the study's external test used, if it ran one."""
    record, _ = load_run(run)
    split, cfg = record["split"], RunFolder(run).config()
    items = [
        ("Data source", DATASET),
        ("Eligibility / selection", "all slices of the public dataset; no exclusion"),
        ("Ground truth", "folder labels of the public dataset (RT-PCR per the dataset authors); not re-read"),
        ("De-identification", "public de-identified PNG slices"),
        ("Partition method", f"{split.get('kind', '?')} split, seed {split.get('seed', '?')}, "
                             f"test fraction {split.get('test_fraction', '?')}"),
        ("Partition level", "slice (no patient IDs); the scan split keeps segments of consecutively numbered look-alike slices (a scan proxy) together"),
        ("Sample sizes", f"train {split['sizes']['train']}, validation {split['sizes']['val']}, "
                         f"test {split['sizes']['test']}"),
        ("Model", f"{cfg.arch}, {record['parameters']:,} parameters, {_how_trained(cfg)}"),
        ("Training details", f"Adam lr {cfg.learning_rate}, batch {cfg.batch_size}, "
                             f"early stopping on validation loss (patience {cfg.patience})"),
        ("Metrics with uncertainty", "accuracy, precision, recall, specificity, F1, AUC with 95% stratified "
                                     "bootstrap CIs (1000 resamples)"),
        ("Statistical comparison", "paired bootstrap of the AUC and accuracy differences (whole scans resampled "
                                   "on a scan split) and exact McNemar on slices, Holm-corrected"),
        ("External testing", f"evaluation only, on {Path(external).name} (the validity chapter)" if external else
         "not in this study; `covidlib evaluate --run RUN --data DIR` on another folder"),
        ("Explainability", "CAM / Grad-CAM / saliency with randomisation and deletion sanity checks"),
        ("Code and data availability", "covidlib (MIT); data CC BY-NC-SA 4.0; split file hash "
                                       f"`{split['sha256'][:16]}`, manifest hash "
                                       f"`{record['data']['manifest_hash'][:16]}`"),
    ]
    return "# CLAIM 2024 checklist (from the run record)\n\n| item | this run |\n|---|---|\n" + "".join(
        f"| {k} | {v} |\n" for k, v in items)


def what_ran(study: str | Path, *, full: bool = True) -> str:
    """The admonition every results page opens with: what produced its numbers.

    Preset, dataset (name, images, manifest hash), split kinds, seeds, commit, date, device and the
    study's wall time; with ``full``, one row per run (mode, weights, input size, epochs run). A
    smoke build says plainly that its numbers mean nothing.
    """
    study = StudyFolder(study)
    runs = finished_runs(study.runs_dir)
    if not runs:
        return ":::{admonition} What ran\n:class: warning\nNo run of this study finished.\n:::\n"
    records = {run.name: run.record() for run in runs}
    configs = {run.name: run.config() for run in runs}
    first = next(iter(records.values()))
    cfg, data, device = next(iter(configs.values())), first["data"], first.get("device", {})
    status = study.status()
    seconds = sum(v.get("seconds", 0) for v in status.values())
    last = status.get("study", {})
    wall, what = last.get("wall_seconds"), "training and report notebooks" if last.get("reports") else "training"
    trained = sorted({r.get("versions", {}).get("covidlib_commit", "not recorded") for r in records.values()})
    # a subsample (the smoke preset's max_images) is what makes numbers meaningless, whatever the preset's name
    smoke = any(c.max_images for c in configs.values())
    kinds = sorted({r["split"].get("kind", "?") for r in records.values()})
    seeds = sorted({c.seed for c in configs.values()})
    lines = [":::{admonition} What ran", f":class: {'warning' if smoke else 'note'}"]
    if smoke:
        lines.append(f"**A smoke build: these numbers mean nothing.** {cfg.max_images} slices at tiny sizes for "
                     f"{cfg.epochs} epochs check that every step runs; `covidlib study --preset cpu` gives real "
                     "numbers.\n")
    lines.append(f"Preset **{Path(cfg.preset).stem}** on **{Path(data['root']).name}** ({data['images']} images, manifest "
                 f"`{data['manifest_hash'][:12]}`); {len(records)} runs on the {' and '.join(kinds)} "
                 f"split{'s' * (len(kinds) > 1)}; seed{'s' * (len(seeds) > 1)} {', '.join(map(str, seeds))}; "
                 f"trained at commit {', '.join(f'`{c}`' for c in trained)}; book built at `{git_commit()}` on "
                 f"{datetime.date.today().isoformat()}; "
                 f"{device.get('device', 'CPU')} ({device.get('mixed_precision', 'float32')}); "
                 + (f"the last `covidlib study` call took {wall / 60:.0f} min ({what}, before the book); " if wall else "")
                 + f"{seconds / 60:.0f} min of run and notebook time summed.")
    if full:
        # folded: a study of 36 runs would push the page's findings a screen down
        lines += [":::", "", f":::{{admonition}} The {len(records)} runs", ":class: dropdown", "",
                  "| run | mode | weights | input | epochs run |", "|---|---|---|---|---|"]
        lines += [f"| {name} | {configs[name].mode} | {configs[name].weights} | {configs[name].input_size} px | "
                  f"{r['epochs_run']} |" for name, r in records.items()]
    lines.append(":::")
    return "\n".join(lines) + "\n"
