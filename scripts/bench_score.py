#!/usr/bin/env python
"""Scoring speed and memory, as ratios against baselines run on this machine in this script.

(a) end-to-end images/s of `msc-ray score` (list → read → decode → preprocess → model actor →
    report) against the bare model forward pass on preprocessed tensors: same model, batch size and
    torch threads (one, as a model actor gets; scoring runs one actor here, `concurrency=1`). Aim: at
    least 0.9. End-to-end is the steady state: the 1x and the 10x archive are both scored, and the
    extra images over the extra time cancel the start-up (printed on its own, with the plain wall-time
    rates).
(b) end-to-end images/s against a plain script: torch DataLoader (decode + preprocess in one worker
    process) → model → CSV. Aim: at least 1.0.
(c) peak memory (resident set of the whole process tree, sampled) scoring a 10x larger archive
    against the 1x archive. Aim: at most 1.2.

    .venv/bin/python scripts/bench_score.py [--n 100] [--src 256] [--backbone resnet18] [--size 128]

With ``--gpu`` (a CUDA machine; defaults ResNet-50 at 300 px, 512-px PNGs, 6,000 images, batch 256):
end-to-end images/s of ``msc-ray score`` with one GPU actor (steady state, and with start-up) against
the bare bfloat16 forward pass of the same model, dtype and batch with its input already on the GPU
(aim: at least 0.5, and at least 2,500 images/s); the GPU's busy fraction while scoring (NVML, sampled
every 0.1 s); and where the time goes — each stage's capacity alone, in images/s: decode on one core
and on all the cores Ray gets, the pinned copy and fitting (resize, normalise) on the GPU, the model.

    python scripts/bench_score.py --gpu [--n 6000] [--src 512] [--backbone resnet50] [--size 300]
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


def _run_scoring(
    archive: str,
    clf: str,
    out: str,
    *,
    init: str = "num_cpus=2",
    extra: str = "",
    flow: list | None = None,
) -> tuple[float, int, int]:
    """Score in a fresh process (its own local Ray, ``ray.init(<init>)``; ``extra``: more ScoreConfig
    arguments); returns (seconds, images, peak tree RSS bytes). ``flow``: gets the images/s between the first and
    the last committed part (the steady state within the run; None with fewer than three parts)."""
    code = (
        "import ray, json, time, sys\n"
        "from msc_ray import score\n"
        f"ray.init({init}, include_dashboard=False, log_to_driver=False)\n"
        "ray.data.DataContext.get_current().enable_progress_bars = False\n"
        f"cfg = score.ScoreConfig(archive={archive!r}, classifier={clf!r}, out={out!r}{extra})\n"
        # when each part is committed, and how many rows by then: the flow rate without the start-up
        "marks = []; commit = score._Committer.commit\n"
        "def timed(self, c, results):\n"
        "    commit(self, c, results); marks.append((time.perf_counter(), self.summary.scored))\n"
        "score._Committer.commit = timed\n"
        "t0 = time.perf_counter(); s = score.score_archive(cfg)\n"
        "flow = (marks[-1][1] - marks[0][1]) / (marks[-1][0] - marks[0][0]) if len(marks) > 2 else None\n"
        "print(json.dumps({'seconds': time.perf_counter() - t0, 'scored': s.scored, 'flow': flow}))\n"
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
    if flow is not None:
        flow.append(res["flow"])
    return res["seconds"], res["scored"], peak


def _nvml():
    """A function returning the GPU's busy percentage over NVML's last sample period (GPU 0), or None
    without NVML."""
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        return lambda: float(pynvml.nvmlDeviceGetUtilizationRates(h).gpu)
    except Exception:  # no NVML library or no GPU
        return None


def busy_share(samples: list[tuple[float, float]]) -> tuple[float, float]:
    """(mean busy % over all samples, mean busy % from the first to the last sample above 0 — the
    stretch where images flow); NaN without samples."""
    if not samples:
        return float("nan"), float("nan")
    vals = [v for _, v in samples]
    on = [i for i, v in enumerate(vals) if v > 0]
    flow = vals[on[0] : on[-1] + 1] if on else vals
    return sum(vals) / len(vals), sum(flow) / len(flow)


def _archive(root: Path, n: int, src: int) -> None:
    """A synthetic single-stack archive of ``n`` PNGs (images only: truth, masks, metadata removed)."""
    from msc_ray import synth

    synth.synthesize(root, synth.SynthConfig(n=n, size=src, stack="sstack", seed=0, workers=os.cpu_count() or 2))
    for extra in ("masks", "truth.parquet", "metadata.csv", "synth_config.json", "sstack/annotations"):
        p = root / extra
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def _random_classifier(path: Path, backbone: str, size: int):
    """A four-band classifier artifact with seeded random weights (speed does not need training);
    returns the model in eval mode."""
    from msc_ray import models

    torch.manual_seed(0)
    model = models.build_classifier(backbone, 4, image_size=size).eval()
    config = {"kind": "classifier", "architecture": backbone, "classes": ["1", "2", "3", "4"], "stack": "sstack"}
    config.update(data={"size": size, "channels": 3}, temperature=1.0)
    models.save_artifact(path, model.state_dict(), config)
    return model


class BusySampler:
    """``with BusySampler() as b: ...`` samples the GPU's busy percentage (NVML) every 0.1 s in a thread;
    ``b.share()`` is :func:`busy_share` of the samples (NaN without NVML)."""

    def __init__(self):
        self.samples: list[tuple[float, float]] = []
        self._nvml, self._stop = _nvml(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while self._nvml is not None and not self._stop.is_set():
            self.samples.append((time.perf_counter(), self._nvml()))
            time.sleep(0.1)

    def __enter__(self) -> BusySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def share(self) -> tuple[float, float]:
        return busy_share(self.samples)


def _timed(fn, reps: int, sync) -> float:
    """Seconds per call of ``fn`` after two warm-up calls."""
    for _ in range(2):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t0) / reps


def gpu_main(args) -> None:
    """Scoring on a GPU against the bare bfloat16 forward pass; busy fraction; stage capacities."""
    import numpy as np

    from msc_ray import inference, score

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    cpus = os.cpu_count() or 2
    tmp = Path(tempfile.mkdtemp())
    small, big = tmp / "x1", tmp / "x5"
    t0 = time.perf_counter()
    _archive(small, args.n // 5, args.src)
    _archive(big, args.n, args.src)
    print(f"archives: {args.n // 5} and {args.n} {args.src}-px PNGs in {time.perf_counter() - t0:.0f}s on {cpus} cores")
    clf_dir = tmp / "clf"
    _random_classifier(clf_dir, args.backbone, args.size)
    clf = inference.Classifier(str(clf_dir), device=dev)
    if cuda:
        clf.to_bfloat16()
    b = args.batch
    x = torch.randn(b, 3, args.size, args.size, device=dev).contiguous(memory_format=torch.channels_last)
    bare = b / _timed(lambda: clf(x), 20 if cuda else 2, sync)  # the actor's call: forward, softmax, to host
    # stage capacities, each alone
    files = sorted(str(p) for p in small.rglob("*.png"))[:64]
    block = {"row": np.arange(len(files)), "uri": files, "key": [Path(f).name for f in files], "stack": ["sstack"] * 64}
    kw = {"cls_cfgs": {"sstack": {"size": args.size, "channels": 3}}, "endpoint_url": None, "max_pixels": 10**9}
    t_dec = _timed(lambda: score._preprocess(block, on_actor=True, **kw), 2, lambda: None)
    decode_core = len(files) / t_dec
    decoded = score._preprocess(block, on_actor=True, **kw)["image"]
    u8 = np.concatenate([decoded] * (b // len(files) + 1))[:b]
    fit = inference.ScoringInput(clf.data_cfg, dev)
    fitting = b / _timed(lambda: fit(u8), 10 if cuda else 2, sync)
    # end to end, one GPU actor; the 5x archive against the 1x one gives the steady state
    init = f"num_cpus={cpus}" + (", num_gpus=1" if cuda else "")
    extra = ", gpus_per_actor=1.0" if cuda else ""
    extra += f", chunk_size={max(args.n // 12, 50)}"  # parts committed through the run: the flow rate
    flow: list = []
    secs, scored, _ = _run_scoring(str(small), str(clf_dir), str(tmp / "r1"), init=init, extra=extra)
    with BusySampler() as busy:
        secs5, scored5, peak = _run_scoring(str(big), str(clf_dir), str(tmp / "r5"), init=init, extra=extra, flow=flow)
    between = (scored5 - scored) / (secs5 - secs)
    e2e = flow[0] if flow and flow[0] else between
    busy_all, busy_flow = busy.share()
    print(
        f"model {args.backbone} at {args.size}px, batch {b}, {args.src}px PNG, "
        f"{torch.cuda.get_device_name(0) if cuda else 'no GPU (CPU run of the GPU mode)'}, {cpus} CPU cores"
    )
    print(f"bare forward ({'bfloat16 weights, ' if cuda else ''}input on the device): {bare:.0f} img/s")
    print(
        f"scoring wall time: {scored} images {secs:.1f}s, {scored5} images {secs5:.1f}s ({scored5 / secs5:.0f} img/s); "
        f"steady state {e2e:.0f} img/s (from the first to the last committed part; the {scored5}- against the "
        f"{scored}-image run: {between:.0f}), start-up {secs5 - scored5 / e2e:.1f}s; peak memory {peak / 2**30:.1f} GiB"
    )
    print(f"end-to-end (steady state) / bare forward: {e2e / bare:.2f} (aim >= 0.5; >= 2500 img/s)")
    print(f"    with start-up, {scored5} images: {scored5 / secs5 / bare:.2f}")
    print(f"GPU busy while scoring {scored5} images: {busy_all:.0f} % of the run, {busy_flow:.0f} % while images flow")
    print(
        f"stage capacities alone (img/s): decode {decode_core:.0f} per core, {decode_core * cpus:.0f} on {cpus} cores; "
        f"pinned copy + fit on {dev.type} {fitting:.0f}; model {bare:.0f}"
    )
    shares = {"decode": 1 / (decode_core * cpus), "copy + fit": 1 / fitting, "model": 1 / bare}
    tot = sum(shares.values())
    print(
        "time per image if the stages ran one after another: "
        + ", ".join(f"{k} {v / tot:.0%}" for k, v in shares.items())
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true", help="the GPU benchmark (see above)")
    ap.add_argument("--n", type=int, default=None, help="images in the 1x archive (GPU: in the larger archive)")
    ap.add_argument("--src", type=int, default=None, help="stored image side (CPU 256, GPU 512)")
    ap.add_argument("--backbone", default=None, help="CPU resnet18, GPU resnet50")
    ap.add_argument("--size", type=int, default=None, help="model input (CPU 128, GPU 300)")
    ap.add_argument("--batch", type=int, default=None, help="images per model call (CPU 32, GPU 256)")
    args = ap.parse_args()
    gpu = args.gpu
    args.n = args.n or (6000 if gpu else 400)
    args.src = args.src or (512 if gpu else 256)
    args.backbone = args.backbone or ("resnet50" if gpu else "resnet18")
    args.size = args.size or (300 if gpu else 128)
    args.batch = args.batch or (256 if gpu else 32)
    if gpu:
        gpu_main(args)
        return

    from torchvision import tv_tensors

    from msc_ray import augment, images
    from msc_ray.config import DataConfig

    tmp = Path(tempfile.mkdtemp())
    small, big = tmp / "x1", tmp / "x10"
    _archive(small, args.n, args.src)
    _archive(big, 10 * args.n, args.src)
    dcfg = DataConfig(size=args.size, channels=3)
    clf = tmp / "clf"
    model = _random_classifier(clf, args.backbone, args.size)

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

    # one model actor: the bare forward and the plain script run the model on one thread too (the default
    # plan on 2 cores runs two actors sharing them with the decoding)
    one = ", concurrency=1"
    secs, scored, peak1 = _run_scoring(str(small), str(clf), str(tmp / "r1"), extra=one)
    secs10, scored10, peak10 = _run_scoring(str(big), str(clf), str(tmp / "r10"), extra=one)
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
