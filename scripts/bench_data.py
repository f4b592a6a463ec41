#!/usr/bin/env python
"""Augmented images/s through the Ray Data pipeline against a torch DataLoader, same work, same cores.

Both sides read, decode, resize and augment the same images with the same functions
(`data.load_image`, the `augment` recipe) on `--cpus` processes, and deliver torch batches to this
process. Each side runs one warm-up epoch (worker start-up) and then `--epochs` timed epochs; the
ratio is Ray Data / DataLoader (above 1.0: Ray Data is faster). Ray Data runs the timed epochs as one
streaming execution (``make_dataset(epochs=...)``: the next epoch's first blocks are decoded while this
one's last are consumed) and, for comparison, as one execution per epoch.

A run is ``--rounds`` rounds, each measuring both sides afresh (Ray started and stopped, a new
DataLoader), which side goes first alternating; a round lasts seconds and the machine's speed drifts, so
the figure to read is the median of the rounds' ratios, printed beside each round's.

    .venv/bin/python scripts/bench_data.py [--n 200] [--src 256] [--size 128] [--cpus 2] [--block 0] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
from torchvision import tv_tensors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="synthetic images per stack (both stacks are read)")
    ap.add_argument("--src", type=int, default=256, help="side of the stored images")
    ap.add_argument("--size", type=int, default=128, help="model input side")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--block", type=int, default=0, help="images per Ray Data task (0: data.block_rows's rule)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of both sides; the ratio read is their median")
    args = ap.parse_args()

    import ray

    from msc_ray import augment, corpus, data, synth
    from msc_ray.config import DataConfig

    tmp = tempfile.mkdtemp()
    synth.synthesize(tmp, synth.SynthConfig(n=args.n, size=args.src, seed=0, workers=args.cpus))
    table, _ = corpus.index_corpus(tmp, folds=5)
    rows = data.select(table)
    cfg = DataConfig(size=args.size, channels=3, decode_batch=args.block)

    class TorchSet(torch.utils.data.Dataset):
        def __init__(self):
            self.uris = rows.column("uri").to_pylist()
            self.paths = rows.column("path").to_pylist()
            self.labels = rows.column("label").to_pylist()
            self.tf = augment.build(cfg, train=True)
            self.epoch = 0

        def __len__(self):
            return len(self.uris)

        def __getitem__(self, i):
            img = tv_tensors.Image(torch.from_numpy(data.load_image(self.uris[i], self.paths[i], cfg)))
            seed = augment.sample_seed(cfg.seed, self.epoch, self.paths[i])
            return augment.apply(self.tf, {"image": img}, seed)["image"].as_subclass(torch.Tensor), self.labels[i]

    def run_torch(epochs: int) -> float:
        ds = TorchSet()
        loader = torch.utils.data.DataLoader(
            ds,
            batch_size=args.batch,
            shuffle=True,
            num_workers=args.cpus,
            persistent_workers=True,
            prefetch_factor=4,
        )
        n, t0 = 0, 0.0
        for e in range(epochs + 1):
            if e == 1:
                t0, n = time.perf_counter(), 0
            ds.epoch = e
            for x, _ in loader:
                n += len(x)
        return n / (time.perf_counter() - t0)

    def run_ray(epochs: int) -> float:
        """One streaming execution per epoch (the warm-up epoch starts the workers)."""
        n, t0 = 0, 0.0
        for e in range(epochs + 1):
            if e == 1:
                t0, n = time.perf_counter(), 0
            for x, _, _ in data.torch_batches(data.make_dataset(rows, cfg, train=True, epoch=e), args.batch):
                n += len(x)
        return n / (time.perf_counter() - t0)

    def run_ray_streamed(epochs: int) -> float:
        """A warm-up epoch, then the timed epochs in one streaming execution (``make_dataset(epochs=...)``)."""
        for _ in data.torch_batches(data.make_dataset(rows, cfg, train=True, epoch=0), args.batch):
            pass
        n, seen, t0 = 0, set(), time.perf_counter()
        ds = data.make_dataset(rows, cfg, train=True, epoch=1, epochs=epochs)
        for e, x, _, _ in data.torch_batches(ds, args.batch, by_epoch=True):
            n += len(x)
            seen.add(e)
        assert seen == set(range(1, epochs + 1)), seen
        return n / (time.perf_counter() - t0)

    def run_ray_both() -> tuple[float, float]:
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        try:
            per_epoch = run_ray(args.epochs)
            return run_ray_streamed(args.epochs), per_epoch
        finally:
            ray.shutdown()

    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    block = data.block_rows(rows.num_rows, cfg, cpus=args.cpus)
    print(
        f"images={rows.num_rows} stored={args.src}px input={args.size}px cpus={args.cpus} "
        f"batch={args.batch} block={block} epochs={args.epochs} rounds={args.rounds}"
    )
    ratios, ratios_per_epoch = [], []
    for r in range(args.rounds):
        if r % 2:  # the DataLoader first in odd rounds: drift in the machine's speed favours neither side
            torch_rate = run_torch(args.epochs)
            streamed, per_epoch = run_ray_both()
        else:
            streamed, per_epoch = run_ray_both()
            torch_rate = run_torch(args.epochs)
        ratios.append(streamed / torch_rate)
        ratios_per_epoch.append(per_epoch / torch_rate)
        print(
            f"round {r + 1}: Ray Data {streamed:7.1f} (one execution per epoch {per_epoch:7.1f}), "
            f"DataLoader {torch_rate:7.1f} augmented images/s; ratio {ratios[-1]:.2f} ({ratios_per_epoch[-1]:.2f})"
        )
    print(
        f"ratio Ray Data / DataLoader, median of {args.rounds} rounds: {statistics.median(ratios):.2f} "
        f"(range {min(ratios):.2f}-{max(ratios):.2f}); one execution per epoch: "
        f"{statistics.median(ratios_per_epoch):.2f}"
    )


if __name__ == "__main__":
    main()
