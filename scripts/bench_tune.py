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

With ``--gpu`` (a CUDA machine; resnet18 at 224 px, batch 64, 1,000 images, fold 0 of 5): one Tune
trial with one GPU, its training batches augmented one image at a time on the CPU (``--augment-on
cpu``) and then as whole batches on the GPU (``device``): epoch seconds, images/s and the GPU's busy
fraction during each trial (NVML, every 0.1 s; aim at least 60 %), and the device trial's epoch against
the same epochs of its own loops in this process without Ray.

    python scripts/bench_tune.py --gpu [--n 1000] [--size 224] [--backbones resnet18] [--timing-epochs 6]
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


def gpu_main(args) -> None:
    """One Tune trial on a GPU with CPU and with device augmentation: epoch time and GPU busy fraction."""
    import ray
    from bench_score import BusySampler

    from msc_ray import corpus, synth
    from msc_ray import tune as mt

    cuda = torch.cuda.is_available()
    tmp = Path(tempfile.mkdtemp())
    synth.synthesize(tmp / "c", synth.SynthConfig(n=args.n, size=args.src, stack="sstack", seed=1, workers=8))
    table, _ = corpus.index_corpus(str(tmp / "c"), folds=5, seed=0)
    manifest = corpus.write_manifest(table, str(tmp / "c" / "manifest.parquet"))
    ray.init(include_dashboard=False, log_to_driver=False)
    backbone = args.backbones.split(",")[0]
    base = mt.TuneJobConfig(
        manifest=manifest,
        out=str(tmp / "run"),
        backbones=(backbone,),
        max_epochs=args.timing_epochs,
        patience=args.timing_epochs + 1,
        samples=1,
        size=args.size,
        batch_size=64,
        pretrained="none",
        asha=False,
        views=1,
        lr_min=1e-3,
        lr_max=1e-3,
        gpus_per_trial=1.0 if cuda else 0.0,
        cpus_per_trial=1.0,
        verbose=0,
    )
    classes = corpus.manifest_info(table)["classes"]["sstack"]
    caches = mt.build_caches(base, table)
    rows = []
    for mode in args.modes.split(","):
        job = replace(base, augment_on=mode)
        space = mt._space(job, "search", 5, classes, backbone=backbone, fold=0, lr=1e-3, weight_decay=job.wd_min)
        t0 = time.perf_counter()
        with BusySampler() as busy:
            mt._run_experiment(job, f"timing-{mode}", space, caches, asha=False, resume=False)
        wall = time.perf_counter() - t0
        epoch = float(np.mean(trial_epoch_times(tmp / "run" / f"timing-{mode}", backbone)))
        rows.append((mode, epoch, wall, *busy.share()))
    ray.shutdown()
    # the same loops in this process: the busy share over exactly the timed epochs (after the first)
    job = replace(base, augment_on="device", max_epochs=args.timing_epochs + 1)
    run = mt.ClassifierRun(
        mt._space(job, "search", 5, classes, backbone=backbone, fold=0, lr=1e-3, weight_decay=job.wd_min), caches
    )
    run.run_epoch(0)
    t0 = time.perf_counter()
    with BusySampler() as busy:
        for epoch in range(1, args.timing_epochs + 1):
            run.run_epoch(epoch)
    plain = (time.perf_counter() - t0) / args.timing_epochs
    plain_busy = busy.share()[0]
    n_train = len(caches[args.size].split(0, 5)[0])
    print(
        f"{backbone} at {args.size}px, batch 64, {n_train} training images of {args.n}, {args.timing_epochs} epochs, "
        f"{torch.cuda.get_device_name(0) if cuda else 'no GPU'}"
    )
    for mode, epoch, wall, busy_all, busy_flow in rows:
        print(
            f"augment on {mode:6s}: epoch {epoch:.2f}s ({n_train / epoch:.0f} training img/s, with inner validation "
            f"and report), trial {wall:.0f}s; GPU busy {busy_all:.0f} % of the trial, {busy_flow:.0f} % while training"
        )
    device_epoch = rows[-1][1]
    if len(rows) > 1:
        print(f"device / cpu augmentation epoch time: {device_epoch / rows[0][1]:.2f}")
    print(
        f"Tune trial epoch (device augmentation) {device_epoch:.2f}s; the same loops in-process {plain:.2f}s; "
        f"ratio {device_epoch / plain:.2f} (aim <= 1.2); GPU busy during those in-process epochs {plain_busy:.0f} %"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true", help="the GPU measurement (see above)")
    ap.add_argument("--src", type=int, default=256, help="--gpu: stored image side")
    ap.add_argument("--modes", default="cpu,device", help="--gpu: augmentation places to time, the device last")
    ap.add_argument("--n", type=int, default=None, help="images (CPU 90, GPU 1000)")
    ap.add_argument("--size", type=int, default=None, help="input side (CPU 64, GPU 224)")
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-epochs", type=int, default=8)
    ap.add_argument("--timing-epochs", type=int, default=6)
    ap.add_argument("--backbones", default=None, help="CPU compact_cnn,mobilenet_v3_small; GPU resnet18")
    args = ap.parse_args()
    args.n = args.n or (1000 if args.gpu else 90)
    args.size = args.size or (224 if args.gpu else 64)
    args.backbones = args.backbones or ("resnet18" if args.gpu else "compact_cnn,mobilenet_v3_small")
    if args.gpu:
        gpu_main(args)
        return

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
