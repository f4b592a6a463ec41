#!/usr/bin/env python
"""What ASHA saves, and what a Tune trial costs, on the synthetic corpus.

1. The search phase twice over the same seeded trials (backbone × fold × sampled lr/wd): once with
   ASHA per fold plus patience, once as the exhaustive grid (every trial to --max-epochs, no early
   stop). Prints epochs run with ASHA / epochs of the grid (aim: at most 0.35) and whether both pick
   the same winner.
2. The mean epoch time of one Tune trial running alone (training from the decoded cache, inner
   validation, checkpoint, report) against the same epochs in this process without Ray: the trial's
   own training object (plain torch loops over the same cache: same augmentation, model, optimizer,
   schedule, batch, validation and metrics), both on one thread. The ratio is what Ray and Tune add.

    .venv/bin/python scripts/bench_tune.py [--n 60] [--folds 3] [--samples 4] [--max-epochs 8]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch


def plain_epoch_time(caches, job, classes, fold: int, folds: int, epochs: int) -> tuple[float, float]:
    """The same epochs as the timed trial, in this process without Ray: the trial's own
    :class:`msc_ray.tune.ClassifierRun` (the plain torch loops of :mod:`msc_ray.engine`: training
    over the cached images with the study's augmentation, inner validation, metrics, early-stopping
    bookkeeping), without Tune's report and checkpoint. Returns (mean epoch time after the first,
    mean of the trial's own ``epoch_seconds`` measure)."""
    from msc_ray import tune as mt

    run = mt.ClassifierRun(
        mt._space(
            job, "search", folds, classes, backbone=job.backbones[0], fold=fold, lr=job.lr_min, weight_decay=job.wd_min
        ),
        caches,
    )
    times, inner = [], []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        report, _, _ = run.run_epoch(epoch)
        times.append(time.perf_counter() - t0)
        inner.append(report["epoch_seconds"])
    return float(np.mean(times[1:])), float(np.mean(inner[1:]))


def trial_epoch_times(exp_dir: Path, backbone: str) -> list[float]:
    out = []
    for res in exp_dir.glob(f"{backbone}-fold*/result.json"):
        lines = [json.loads(x) for x in res.read_text().splitlines() if x.strip()]
        out += [r["time_this_iter_s"] for r in lines[1:]]  # the first epoch includes start-up
        # time_this_iter_s spans report to report: training, validation, checkpoint and reporting
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=90)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-epochs", type=int, default=8)
    ap.add_argument("--timing-epochs", type=int, default=6)
    ap.add_argument("--backbones", default="compact_cnn,mobilenet_v3_small")
    args = ap.parse_args()

    import ray

    from msc_ray import corpus, synth
    from msc_ray import tune as mt

    tmp = Path(tempfile.mkdtemp())
    synth.synthesize(tmp / "c", synth.SynthConfig(n=args.n, size=args.size, stack="sstack", seed=1))
    table, _ = corpus.index_corpus(str(tmp / "c"), folds=args.folds, seed=0)
    manifest = corpus.write_manifest(table, str(tmp / "c" / "manifest.parquet"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    base = mt.TuneJobConfig(
        manifest=manifest,
        out=str(tmp / "run"),
        backbones=tuple(args.backbones.split(",")),
        max_epochs=args.max_epochs,
        patience=2,
        samples=args.samples,
        size=args.size,
        batch_size=16,
        pretrained="none",
        seed=0,
        verbose=0,
        checkpoint_every_s=0,  # a checkpoint after every epoch: the most a trial pays (default: every 30 s)
    )
    classes = corpus.manifest_info(table)["classes"]["sstack"]
    caches = mt.build_caches(base, table)
    t0 = time.perf_counter()
    asha = mt.search_phase(base, args.folds, classes, caches, name="asha")
    t_asha = time.perf_counter() - t0
    grid_job = replace(base, asha=False, patience=args.max_epochs + 1)
    t0 = time.perf_counter()
    grid = mt.search_phase(grid_job, args.folds, classes, caches, name="grid")
    t_grid = time.perf_counter() - t0
    e_asha, e_grid = sum(t.epochs_run for t in asha), sum(t.epochs_run for t in grid)
    w_asha, w_grid = mt.pick_winner(asha, args.folds), mt.pick_winner(grid, args.folds)
    same_trials = sorted((t.backbone, t.fold, round(t.lr, 12)) for t in asha) == sorted(
        (t.backbone, t.fold, round(t.lr, 12)) for t in grid
    )
    # epoch cost: one trial alone (one CPU, one thread), then the same epochs as a plain loop
    first = base.backbones[0]
    timing_job = replace(
        base,
        backbones=(first,),
        asha=False,
        samples=1,
        lr_min=1e-3,
        lr_max=1e-3,
        max_epochs=args.timing_epochs,
        patience=args.timing_epochs + 1,
        max_concurrent=1,
    )
    mt._run_experiment(
        timing_job,
        "timing",
        mt._space(timing_job, "search", args.folds, classes, backbone=first, fold=0, lr=1e-3, weight_decay=base.wd_min),
        caches,
        asha=False,
        resume=False,
    )
    tune_epoch = float(np.mean(trial_epoch_times(tmp / "run" / "timing", first)))
    ray.shutdown()
    torch.set_num_threads(1)
    plain, _ = plain_epoch_time(caches, timing_job, classes, 0, args.folds, args.timing_epochs)
    print(
        f"trials={len(asha)} ({len(base.backbones)} backbones x {args.folds} folds x {args.samples} samples), "
        f"max_epochs={args.max_epochs}, {args.n} images {args.size}px, same sampled trials: {same_trials}"
    )
    print(f"epochs with ASHA+patience: {e_asha}; exhaustive grid: {e_grid}; ratio: {e_asha / e_grid:.2f} (aim <= 0.35)")
    print(f"wall time ASHA {t_asha:.0f}s, grid {t_grid:.0f}s, ratio {t_asha / t_grid:.2f}")
    print(
        f"winner with ASHA: {w_asha['backbone']} lr={w_asha['lr']:.2e}; grid: {w_grid['backbone']} "
        f"lr={w_grid['lr']:.2e}; same backbone: {w_asha['backbone'] == w_grid['backbone']}"
    )
    print(
        f"epoch time of a Tune trial ({first}, cached images, report + checkpoint included): {tune_epoch:.3f}s; "
        f"plain torch loop over the same cache: {plain:.3f}s; ratio {tune_epoch / plain:.2f} (aim <= 1.2)"
    )


if __name__ == "__main__":
    main()
