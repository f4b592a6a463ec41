#!/usr/bin/env python
"""Synthesis speed: images/s on one core at a given size, written to disk as the CLI does.

Prints images/s per core and the ratio against the 20 images/s/core target, plus the share of time
spent rendering versus encoding, measured in this process.

    .venv/bin/python scripts/bench_synth.py [--size 512] [--n 60] [--format png]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core, as the figure is per core

from msc_ray import synth  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--n", type=int, default=60, help="images per stack")
    ap.add_argument("--format", default="png", choices=synth.FORMATS)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = synth.SynthConfig(n=args.n, size=args.size, stack="both", fmt=args.format, seed=1, workers=1)
        specs = synth.plan_corpus(cfg)
        synth.synthesize(os.path.join(tmp, "warm"), synth.SynthConfig(n=2, size=64, seed=9))  # warm imports
        t0 = time.perf_counter()
        for s in specs:
            synth.render(s, args.size)
        t_render = time.perf_counter() - t0
        t0 = time.perf_counter()
        rows = synth.synthesize(os.path.join(tmp, "c"), cfg)
        t_all = time.perf_counter() - t0
    rate = len(rows) / t_all
    print(f"size={args.size} format={args.format} images={len(rows)} (both stacks, one process)")
    print(f"synthesis: {rate:.1f} images/s per core; render only: {len(specs) / t_render:.1f} images/s")
    print(f"ratio to target of 20 images/s/core: {rate / 20:.2f}")
    print(f"rendering share of end-to-end time: {t_render / t_all:.2f}")


if __name__ == "__main__":
    main()
