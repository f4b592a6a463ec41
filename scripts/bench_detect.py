#!/usr/bin/env python
"""Epoch time of the detector through Ray Train (TorchTrainer, one worker, Ray Data shard) against
a plain torch loop (DataLoader, same images, same box-aware augmentation, same model, optimizer and
batch), measured here. Prints the ratio (aim: at most 1.15). Epochs after the first are averaged.

    .venv/bin/python scripts/bench_detect.py [--n 40] [--size 128] [--epochs 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def plain_loop(job, epochs: int) -> float:
    from torchvision import tv_tensors

    from msc_ray import augment, corpus, data, models

    manifest = corpus.read_manifest(job.manifest)
    rows = data.select(manifest, stack="sstack", fold=0, train=True)
    dcfg = job.data_config()
    tf = augment.build(dcfg, train=True, boxes=True)
    uris, paths = rows.column("uri").to_pylist(), rows.column("path").to_pylist()
    boxes = [[[b["x1"], b["y1"], b["x2"], b["y2"]] for b in bs] for bs in rows.column("boxes").to_pylist()]

    class Set(torch.utils.data.Dataset):
        epoch = 0

        def __len__(self):
            return len(uris)

        def __getitem__(self, i):
            img = torch.from_numpy(data.load_image(uris[i], paths[i], dcfg))
            bx = torch.tensor(boxes[i], dtype=torch.float32).reshape(-1, 4)
            s = {
                "image": tv_tensors.Image(img),
                "labels": torch.ones(len(bx), dtype=torch.int64),
                "boxes": tv_tensors.BoundingBoxes(bx, format="XYXY", canvas_size=tuple(img.shape[-2:])),
            }
            out = augment.apply(tf, s, augment.sample_seed(0, self.epoch, paths[i]))
            return out["image"].as_subclass(torch.Tensor), {
                "boxes": out["boxes"].as_subclass(torch.Tensor),
                "labels": out["labels"],
            }

    ds = Set()
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=job.batch_size,
        shuffle=True,
        num_workers=1,
        persistent_workers=True,
        collate_fn=lambda b: tuple(zip(*b, strict=True)),
    )
    model = models.build_detector(job.backbone, image_size=job.size)
    opt = torch.optim.AdamW(model.parameters(), lr=job.lr, weight_decay=job.weight_decay)
    times = []
    for e in range(epochs):
        ds.epoch = e
        t0 = time.perf_counter()
        model.train()
        for imgs, targets in loader:
            loss = sum(model(list(imgs), list(targets)).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
        times.append(time.perf_counter() - t0)
    return float(np.mean(times[1:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--backbone", default="resnet18_fpn")
    args = ap.parse_args()

    import ray

    from msc_ray import corpus, detect, synth

    tmp = Path(tempfile.mkdtemp())
    synth.synthesize(
        tmp / "c", synth.SynthConfig(n=args.n, size=args.size, stack="sstack", seed=4, abnormal_fraction=0.5)
    )
    table, _ = corpus.index_corpus(str(tmp / "c"), folds=2)
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
    )
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    _, last = detect._train_fold(job, 0)
    ray.shutdown()
    torch.set_num_threads(1)  # a Ray Train worker with one CPU runs torch on one thread
    plain = plain_loop(job, args.epochs)
    trainer = last["mean_epoch_seconds"]
    print(f"{args.backbone} at {args.size}px, {last['images']} training images, batch 4, 1 worker / 1 process, 2 CPUs")
    print(
        f"epoch time through TorchTrainer: {trainer:.2f}s; plain torch loop: {plain:.2f}s; "
        f"ratio {trainer / plain:.2f} (aim <= 1.15)"
    )


if __name__ == "__main__":
    main()
