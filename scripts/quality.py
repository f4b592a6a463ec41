#!/usr/bin/env python
"""Single-stack and multi-stack accuracy on the synthetic corpus for small backbones, on a CPU.

Synthesises a corpus (both stacks), indexes it with grouped folds, runs the full `msc-ray tune`
search per stack, and prints Table 1 for each: mean ± SD over folds of micro ROC-AUC, accuracy and
micro PR-AUC per backbone, then the settings used. Every figure comes from the run it prints.

    .venv/bin/python scripts/quality.py [--n 150] [--size 128] [--folds 3] [--max-epochs 8]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=150, help="images per stack")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--max-epochs", type=int, default=8)
    ap.add_argument("--patience", type=int, default=3)
    ap.add_argument("--backbones", default="resnet18,mobilenet_v3_small")
    ap.add_argument("--out", default=None, help="keep the runs here (default: a temporary folder)")
    args = ap.parse_args()

    import ray

    from msc_ray import corpus, synth
    from msc_ray import tune as mt

    out = Path(args.out or tempfile.mkdtemp())
    synth.synthesize(out / "corpus", synth.SynthConfig(n=args.n, size=args.size, seed=7, workers=2))
    table, _ = corpus.index_corpus(str(out / "corpus"), folds=args.folds, seed=0)
    manifest = corpus.write_manifest(table, str(out / "corpus" / "manifest.parquet"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    report = {}
    for stack in ("sstack", "mstack"):
        t0 = time.perf_counter()
        job = mt.TuneJobConfig(
            manifest=manifest,
            out=str(out / f"run-{stack}"),
            stack=stack,
            backbones=tuple(args.backbones.split(",")),
            max_epochs=args.max_epochs,
            patience=args.patience,
            samples=args.samples,
            size=args.size,
            batch_size=32,
            pretrained="none",
            asha=False,
        )
        outcome = mt.run_search(job)
        report[stack] = {
            "minutes": (time.perf_counter() - t0) / 60,
            "table": outcome.table,
            "winner": outcome.winner,
        }
        print(f"\n== {stack} ({(time.perf_counter() - t0) / 60:.1f} min)")
        print(Path(outcome.outputs["table_md"]).read_text())
    print(
        f"settings: {args.n} images per stack at {args.size}px, {args.folds} folds grouped by vessel, "
        f"{args.samples} lr/wd sample(s) per backbone and fold, up to {args.max_epochs} epochs, patience "
        f"{args.patience}, batch 32, random init (no ImageNet weights), 2 CPU cores"
    )
    (out / "quality.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"runs and quality.json under {out}")


if __name__ == "__main__":
    main()
