#!/usr/bin/env python
"""Online service throughput and latency against the bare model, in one process.

Starts the Serve application (one replica) on a local Ray, sends single-image POST /predict requests
from 1, 8 and 32 concurrent clients, and prints requests/s and p50/p99 latency beside the bare
forward pass (decode + preprocess + classifier + detector, one image at a time, in this process) on
the same images: the ratio is what HTTP, Serve's routing and batching cost or win.

    .venv/bin/python scripts/bench_serve.py [--requests 96] [--classifier ART --detector ART]

Without artifacts it builds untrained ones (compact_cnn at 64 px, compact_fpn at 128 px: speed does
not depend on training) and synthesises 128-px images.
"""

from __future__ import annotations

import argparse
import socket
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def make_artifacts(root: Path) -> tuple[str, str]:
    import torch

    from msc_ray import models

    torch.manual_seed(0)
    models.save_artifact(
        root / "clf",
        models.build_classifier("compact_cnn", 4, image_size=64, extra_outputs=1).state_dict(),
        {
            "kind": "classifier",
            "architecture": "compact_cnn",
            "classes": ["1", "2", "3", "4"],
            "stack": "sstack",
            "data": {"size": 64, "channels": 3},
            "confluence_output": True,
        },
    )
    models.save_artifact(
        root / "det",
        models.build_detector("compact_fpn", image_size=128).state_dict(),
        {
            "kind": "detector",
            "architecture": "compact_fpn",
            "classes": ["Flatten"],
            "image_size": 128,
            "score_threshold": 0.3,
            "nms_iou": 0.5,
        },
    )
    return str(root / "clf"), str(root / "det")


def post(url: str, data: bytes) -> float:
    t = time.perf_counter()
    req = urllib.request.Request(url, data=data, method="POST")
    with urllib.request.urlopen(req, timeout=120) as r:
        r.read()
        assert r.status == 200
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=96, help="requests per concurrency level")
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--classifier", default=None)
    ap.add_argument("--detector", default=None)
    ap.add_argument("--max-batch-size", type=int, default=16)
    args = ap.parse_args()

    import ray
    from ray import serve

    from msc_ray import images, inference, synth
    from msc_ray import serve as serve_mod

    tmp = Path(tempfile.mkdtemp())
    clf_uri, det_uri = (args.classifier, args.detector) if args.classifier else make_artifacts(tmp)
    synth.synthesize(tmp / "img", synth.SynthConfig(n=16, size=128, stack="sstack", seed=3))
    blobs = [p.read_bytes() for p in sorted((tmp / "img").rglob("*.png"))][:16]

    # the bare model, one image at a time, as a request would see it
    clf = inference.Classifier(clf_uri)
    det = inference.Detector(det_uri, device=clf.device) if det_uri else None

    def bare(data: bytes) -> None:
        img = images.decode(data, "x")
        clf(clf.prepare(img)[None])
        if det:
            d, s = det.prepare(img)
            det([d], [s])

    for b in blobs[:4]:
        bare(b)  # warm-up
    t = time.perf_counter()
    reps = max(32, args.requests // 2)
    for i in range(reps):
        bare(blobs[i % len(blobs)])
    bare_s = (time.perf_counter() - t) / reps

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = serve_mod.ServeConfig(classifier=(clf_uri,), detector=det_uri, port=port, max_batch_size=args.max_batch_size)
    url = serve_mod.start(cfg) + "predict"
    try:
        for b in blobs[:4]:
            post(url, b)
        print(f"bare model, one image at a time: {1 / bare_s:.1f} images/s ({1000 * bare_s:.1f} ms each)")
        print(f"{'clients':>8} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'req/s ÷ bare':>13}")
        for c in (int(x) for x in args.clients.split(",")):
            t = time.perf_counter()
            with ThreadPoolExecutor(c) as pool:
                lat = list(pool.map(lambda i: post(url, blobs[i % len(blobs)]), range(args.requests)))
            wall = time.perf_counter() - t
            rps = args.requests / wall
            p50, p99 = (1000 * float(np.percentile(lat, q)) for q in (50, 99))
            print(f"{c:>8} {rps:>8.1f} {p50:>8.1f} {p99:>8.1f} {rps * bare_s:>13.2f}")
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
