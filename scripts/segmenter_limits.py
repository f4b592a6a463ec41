#!/usr/bin/env python
"""Where a U-Net segmenter loses its masks: mask AP on synthetic images of new vessels with its maps as
they are, and with each group of them (cell foreground and contacts, nucleus foreground and contacts,
offsets) replaced by the truth's, the instance drawing unchanged (``msc_ray.segment.map_limits``). The
last row, every map exact, is the drawing's own ceiling. Then the U-Net's own recall of cells and nuclei
by the visible area of each (how many of the small visible parts, cells mostly under their neighbours,
slivers of nuclei under another cell, it finds at all). Prints both tables; writes limits.json.

    .venv/bin/python scripts/segmenter_limits.py RUN/artifact [--n 150] [--seed 1234] [--views 8]

The corpus is synthesised here from ``--seed`` at the artifact's image size: use a seed that nothing
the artifact was trained or chosen on came from. Mask AP counts every instance of score ≥ 0.05, as the
outer folds of ``msc-ray train-segmenter`` do (not the artifact's counting thresholds).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact", help="a U-Net segmenter artifact (msc-ray train-segmenter's RUN/artifact)")
    ap.add_argument("--n", type=int, default=150, help="single-stack images of new vessels")
    ap.add_argument("--seed", type=int, default=1234, help="the new vessels' corpus seed")
    ap.add_argument("--views", type=int, default=0, help="test-time views (0: the artifact's)")
    ap.add_argument("--out", default="", help="folder for the corpus and limits.json (default: a temporary one)")
    args = ap.parse_args()

    import ray
    import torch

    from msc_ray import check_views, corpus, data, engine, models, segment, synth
    from msc_ray.segment import SegmentJobConfig

    model, cfg = models.load_segmenter(args.artifact)
    if args.views:
        check_views(args.views, f"--views {args.views}")
        model.views = args.views
    model.score_thresh = 0.05  # AP over every instance, as the outer folds measure it
    out = Path(args.out or tempfile.mkdtemp(prefix="msc-ray-limits-"))
    root = out / "corpus"
    size = int(cfg["image_size"])
    workers = os.cpu_count() or 2
    synth.synthesize(root, synth.SynthConfig(n=args.n, size=size, stack="sstack", seed=args.seed, workers=workers))
    table, _ = corpus.index_corpus(str(root), folds=3, seed=0)
    manifest = corpus.write_manifest(table, str(root / "manifest.parquet"))
    ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    job = SegmentJobConfig(manifest=manifest, out=str(out), size=size)
    cache = data.build_cache(data.select(table, stack="sstack"), job.data_config(), masks=True)
    ray.shutdown()
    t0 = time.perf_counter()
    limits, recall = segment.map_limits(
        model, cache, engine.Augmenter(job.data_config(), train=False), batch_size=16, device=torch.device("cpu")
    )
    print(
        f"\n{len(cache)} images of new vessels (seed {args.seed}, {size} px), {model.views} view(s), vote centres at "
        f"{model.vote_peak:g}; {time.perf_counter() - t0:.0f} s\n"
    )
    print("| maps | cell mask AP@0.5 | nucleus mask AP@0.5 | cell AP@[.5:.95] | nucleus AP@[.5:.95] |")
    print("|---|---|---|---|---|")
    for name, r in limits.items():
        figs = (r["cell_mask_ap50"], r["nucleus_mask_ap50"], r["cell_mask_ap"], r["nucleus_mask_ap"])
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in figs) + " |")
    print(f"\nThe U-Net's recall by the visible area of the true instance (px at {size} px; mask IoU ≥ 0.5):\n")
    print("| visible area | cells | found | nuclei | found |")
    print("|---|---|---|---|---|")
    for cell, nucleus in zip(recall["cell"], recall["nucleus"], strict=True):
        span = f"{cell['min_area']}–{cell['max_area'] - 1}" if cell["max_area"] else f"≥ {cell['min_area']}"
        share = [f"{b['found'] / b['true']:.2f}" if b["true"] else "–" for b in (cell, nucleus)]
        print(f"| {span} | {cell['true']} | {share[0]} | {nucleus['true']} | {share[1]} |")
    res = {
        "artifact": args.artifact,
        "seed": args.seed,
        "images": len(cache),
        "views": model.views,
        "limits": limits,
        "recall_by_area": recall,
    }
    (out / "limits.json").write_text(json.dumps(res, indent=2) + "\n")
    print(f"\nlimits.json: {out / 'limits.json'}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # a wrong artifact or option: one line, no traceback
        raise SystemExit(f"error: {e}") from None
