#!/usr/bin/env python
"""Scoring speed and memory, as ratios against baselines run on this machine in this script.

(a) end-to-end images/s of `msc-ray score` (list → read → decode → preprocess → model actor →
    report) against the bare model forward pass on preprocessed tensors: same model, batch size and
    torch threads (one, as a model actor gets). Aim: at least 0.9. End-to-end is the steady state:
    the 1x and the 10x archive are both scored, and the extra images over the extra time cancel the
    start-up (printed on its own, with the plain wall-time rates).
(b) end-to-end images/s against a plain script: torch DataLoader (decode + preprocess in one worker
    process) → model → CSV. Aim: at least 1.0.
(c) peak memory (resident set of the whole process tree, sampled) scoring a 10x larger archive
    against the 1x archive. Aim: at most 1.2.

    .venv/bin/python scripts/bench_score.py [--n 100] [--src 256] [--backbone resnet18] [--size 128]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch


def _tree_rss(root_pid: int) -> int:
    """Resident bytes of a process and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as fh:
                parts = fh.read().rsplit(")", 1)[1].split()
            ppid, pages = int(parts[1]), int(parts[21])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
        rss[int(d)] = pages * os.sysconf("SC_PAGE_SIZE")
    total, stack = 0, [root_pid]
    while stack:
        p = stack.pop()
        total += rss.get(p, 0)
        stack.extend(children.get(p, []))
    return total


def _run_scoring(archive: str, clf: str, out: str) -> tuple[float, int, int]:
    """Score in a fresh process (its own local Ray); returns (seconds, images, peak tree RSS bytes)."""
    code = (
        "import ray, json, time, sys\n"
        "from msc_ray import score\n"
        "ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)\n"
        "ray.data.DataContext.get_current().enable_progress_bars = False\n"
        f"cfg = score.ScoreConfig(archive={archive!r}, classifier={clf!r}, out={out!r})\n"
        "t0 = time.perf_counter(); s = score.score_archive(cfg)\n"
        "print(json.dumps({'seconds': time.perf_counter() - t0, 'scored': s.scored}))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak = 0
    stop = threading.Event()

    def sample():
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _tree_rss(proc.pid))
            time.sleep(0.1)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out_text = proc.communicate()[0]
    stop.set()
    th.join()
    res = json.loads(out_text.strip().splitlines()[-1])
    return res["seconds"], res["scored"], peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=400, help="images in the 1x archive")
    ap.add_argument("--src", type=int, default=256)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()

    from torchvision import tv_tensors

    from msc_ray import augment, images, models, synth
    from msc_ray.config import DataConfig

    tmp = Path(tempfile.mkdtemp())
    small, big = tmp / "x1", tmp / "x10"
    synth.synthesize(small, synth.SynthConfig(n=args.n, size=args.src, stack="sstack", seed=0, workers=2))
    synth.synthesize(big, synth.SynthConfig(n=10 * args.n, size=args.src, stack="sstack", seed=0, workers=2))
    for extra in ("masks", "truth.parquet", "metadata.csv", "synth_config.json", "sstack/annotations"):
        for root in (small, big):
            p = root / extra
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    torch.manual_seed(0)
    model = models.build_classifier(args.backbone, 4, image_size=args.size).eval()
    dcfg = DataConfig(size=args.size, channels=3)
    clf = tmp / "clf"
    models.save_artifact(
        clf,
        model.state_dict(),
        {
            "kind": "classifier",
            "architecture": args.backbone,
            "classes": ["1", "2", "3", "4"],
            "stack": "sstack",
            "data": {"size": args.size, "channels": 3},
            "temperature": 1.0,
        },
    )

    # bare forward pass: preprocessed tensors already in memory, one thread, same batch
    torch.set_num_threads(1)
    n_img = args.n
    x = torch.rand(args.batch, 3, args.size, args.size)
    with torch.inference_mode():
        model(x)
        t0 = time.perf_counter()
        done = 0
        while done < n_img:
            model(x)
            done += args.batch
    bare = done / (time.perf_counter() - t0)

    # plain script: DataLoader (one worker decodes while the main process runs the model) → CSV
    files = sorted(str(p) for p in small.rglob("*.png"))
    tf = augment.build(dcfg, train=False)

    class Set(torch.utils.data.Dataset):
        def __len__(self):
            return len(files)

        def __getitem__(self, i):
            try:
                img = images.to_channels(images.decode(open(files[i], "rb").read(), files[i]), 3)
                return (
                    tf({"image": tv_tensors.Image(torch.from_numpy(img))})["image"].as_subclass(torch.Tensor),
                    i,
                    "",
                )
            except images.ImageError as exc:
                return torch.zeros(3, args.size, args.size), i, str(exc)

    loader = torch.utils.data.DataLoader(Set(), batch_size=args.batch, num_workers=1)
    t0 = time.perf_counter()
    with open(tmp / "plain.csv", "w", newline="") as fh, torch.inference_mode():
        w = csv.writer(fh)
        for xb, ib, eb in loader:
            p = torch.softmax(model(xb), 1)
            for i, row, e in zip(ib.tolist(), p.tolist(), eb, strict=True):
                w.writerow([files[i], e, *row])
    plain = len(files) / (time.perf_counter() - t0)

    secs, scored, peak1 = _run_scoring(str(small), str(clf), str(tmp / "r1"))
    secs10, scored10, peak10 = _run_scoring(str(big), str(clf), str(tmp / "r10"))
    # steady state: the 9x extra images over the extra time; the start-up (listing, model checks, the
    # actor's process, imports and model load, the first block) is the same in both runs and cancels
    e2e = (scored10 - scored) / (secs10 - secs)
    startup = secs - scored / e2e
    print(f"model {args.backbone} at {args.size}px, batch {args.batch}, {args.src}px PNG, 2 CPUs")
    print(f"bare forward: {bare:.1f} img/s; plain DataLoader->CSV: {plain:.1f} img/s ({len(files)} images)")
    print(
        f"scoring wall time: {scored} images {secs:.1f}s ({scored / secs:.1f} img/s), {scored10} images "
        f"{secs10:.1f}s ({scored10 / secs10:.1f} img/s); steady state {e2e:.1f} img/s, start-up {startup:.1f}s"
    )
    print(f"(a) end-to-end (steady state) / bare forward: {e2e / bare:.2f} (aim >= 0.9)")
    print(f"(b) end-to-end (steady state) / plain script: {e2e / plain:.2f} (aim >= 1.0)")
    print(f"    with start-up, {scored10} images: {scored10 / secs10 / bare:.2f} / {scored10 / secs10 / plain:.2f}")
    print(
        f"(c) peak memory {scored10} vs {scored} images: {peak10 / 2**20:.0f} MiB / {peak1 / 2**20:.0f} MiB = "
        f"{peak10 / peak1:.2f} (aim <= 1.2)"
    )


if __name__ == "__main__":
    main()
