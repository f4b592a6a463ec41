#!/usr/bin/env python
"""Epoch time of the detector through Ray Train (TorchTrainer, one worker, images decoded once and
shared through the object store, inner validation, checkpoint) against a plain torch loop doing the
same epochs over the same cache (same box-aware augmentation, model, optimizer and batch), measured
here. Prints the ratio (aim: at most 1.15). Epochs after the first are averaged.

    .venv/bin/python scripts/bench_detect.py [--n 40] [--size 128] [--epochs 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def plain_loop(job, cache, anchors, epochs: int) -> float:
    """The worker's epochs as a plain torch loop: same decoded cache, box-aware augmentation, model,
    optimizer, batch and inner-validation pass; no Ray Train, no checkpoint, no report."""
    from msc_ray import engine, models

    train, val, _ = cache.split(0, 3)
    model = models.build_detector(job.backbone, image_size=job.size, anchors=anchors)
    opt = torch.optim.AdamW(model.parameters(), lr=job.lr, weight_decay=job.weight_decay)
    aug = engine.Augmenter(job.data_config(), train=True, boxes=True)
    plain = engine.Augmenter(job.data_config(), train=False, boxes=True)
    times = []
    for e in range(epochs):
        t0 = time.perf_counter()
        model.train()
        order = engine.epoch_order(len(train), job.seed, e)
        for i in range(0, len(order), job.batch_size):
            pairs = [aug.one(train.images[j], train.keys[j], e, train.boxes[j]) for j in order[i : i + job.batch_size]]
            targets = [{"boxes": b, "labels": torch.ones(len(b), dtype=torch.int64)} for _, b in pairs]
            loss = sum(model([x for x, _ in pairs], targets).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            for i in range(0, len(val), job.batch_size * 2):
                model(
                    [
                        plain.one(val.images[j], val.keys[j], 0, val.boxes[j])[0]
                        for j in range(i, min(i + job.batch_size * 2, len(val)))
                    ]
                )
        times.append(time.perf_counter() - t0)
    return float(np.mean(times[1:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--backbone", default="compact_fpn")
    args = ap.parse_args()

    import ray

    from msc_ray import corpus, data, detect, engine, models, synth

    tmp = Path(tempfile.mkdtemp())
    synth.synthesize(
        tmp / "c", synth.SynthConfig(n=args.n, size=args.size, stack="sstack", seed=4, abnormal_fraction=0.5)
    )
    table, _ = corpus.index_corpus(str(tmp / "c"), folds=3)
    manifest = corpus.write_manifest(table, str(tmp / "c" / "manifest.parquet"))
    job = detect.DetectJobConfig(
        manifest=manifest,
        out=str(tmp / "run"),
        folds=(0,),
        epochs=args.epochs,
        workers=1,
        cpus_per_worker=1,
        backbone=args.backbone,
        size=args.size,
        batch_size=4,
        patience=args.epochs + 1,
    )
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    cache = data.build_cache(detect.detection_rows(table, "sstack"), job.data_config(), detection=True)
    anchors = engine.anchor_plan(cache.split(0, 3)[0].boxes, models.DETECTOR_LEVELS[job.backbone])
    _, last = detect._train_fold(job, 0, 3, ray.put(cache), anchors)
    ray.shutdown()
    torch.set_num_threads(1)  # a Ray Train worker with one CPU runs torch on one thread
    plain = plain_loop(job, cache, anchors, args.epochs)
    trainer = last["mean_epoch_seconds"]
    print(
        f"{args.backbone} at {args.size}px, {last['images']} training images, batch {job.batch_size}, "
        "1 worker / 1 process, 2 CPUs"
    )
    print(
        f"epoch time through TorchTrainer: {trainer:.2f}s; plain torch loop: {plain:.2f}s; "
        f"ratio {trainer / plain:.2f} (aim <= 1.15)"
    )


if __name__ == "__main__":
    main()
