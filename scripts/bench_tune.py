#!/usr/bin/env python
"""What ASHA saves, and what a Tune trial costs, on the synthetic corpus.

1. The search phase twice over the same seeded trials (backbone × fold × sampled lr/wd): once with
   ASHA per fold plus patience, once as the exhaustive grid (every trial to --max-epochs, no early
   stop). Prints epochs run with ASHA / epochs of the grid (aim: at most 0.35) and whether both pick
   the same winner.
2. The mean epoch time of a Tune trial (Ray Data feeding, reporting, checkpointing) against a plain
   torch loop (DataLoader, same images, same augmentation, same model and batch) in this process.

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


def plain_epoch_time(manifest, backbone: str, size: int, batch: int, epochs: int = 3) -> float:
    from torchvision import tv_tensors

    from msc_ray import augment, corpus, data, models
    from msc_ray.config import DataConfig

    table = corpus.read_manifest(manifest)
    rows = data.select(table, stack="sstack", fold=0, train=True)
    cfg = DataConfig(size=models.input_size(backbone, size), channels=3, decode_batch=min(32, batch))
    tf = augment.build(cfg, train=True)
    uris, paths, labels = (rows.column(c).to_pylist() for c in ("uri", "path", "label"))

    class Set(torch.utils.data.Dataset):
        epoch = 0

        def __len__(self):
            return len(uris)

        def __getitem__(self, i):
            img = tv_tensors.Image(torch.from_numpy(data.load_image(uris[i], paths[i], cfg)))
            out = augment.apply(tf, {"image": img}, augment.sample_seed(0, self.epoch, paths[i]))["image"]
            return out.as_subclass(torch.Tensor), labels[i]

    ds = Set()
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=1, persistent_workers=True)
    n_classes = len(corpus.manifest_info(table)["classes"]["sstack"])
    model = models.build_classifier(backbone, n_classes, image_size=cfg.size)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, amsgrad=True)
    times = []
    for e in range(epochs):
        ds.epoch = e
        t0 = time.perf_counter()
        model.train()
        for x, y in loader:
            if len(y) < 2:
                continue
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        times.append(time.perf_counter() - t0)
    return float(np.mean(times[1:]))


def trial_epoch_times(exp_dir: Path, backbone: str) -> list[float]:
    out = []
    for res in exp_dir.glob(f"{backbone}-fold*/result.json"):
        lines = [json.loads(x) for x in res.read_text().splitlines() if x.strip()]
        out += [r["time_this_iter_s"] for r in lines[1:]]  # the first epoch includes start-up
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-epochs", type=int, default=8)
    ap.add_argument("--backbones", default="resnet18,mobilenet_v3_small")
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
    )
    t0 = time.perf_counter()
    asha = mt.search_phase(base, args.folds, name="asha")
    t_asha = time.perf_counter() - t0
    grid_job = replace(base, asha=False, patience=args.max_epochs + 1)
    t0 = time.perf_counter()
    grid = mt.search_phase(grid_job, args.folds, name="grid")
    t_grid = time.perf_counter() - t0
    e_asha, e_grid = sum(t.epochs_run for t in asha), sum(t.epochs_run for t in grid)
    w_asha, w_grid = mt.pick_winner(asha, args.folds), mt.pick_winner(grid, args.folds)
    same_trials = sorted((t.backbone, t.fold, round(t.lr, 12)) for t in asha) == sorted(
        (t.backbone, t.fold, round(t.lr, 12)) for t in grid
    )
    first = base.backbones[0]
    tune_epoch = float(np.mean(trial_epoch_times(tmp / "run" / "grid", first)))
    ray.shutdown()
    torch.set_num_threads(1)
    plain = plain_epoch_time(manifest, first, args.size, 16)
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
        f"epoch time of a Tune trial ({first}): {tune_epoch:.2f}s; plain torch loop: {plain:.2f}s; "
        f"ratio {tune_epoch / plain:.2f}"
    )


if __name__ == "__main__":
    main()
