#!/usr/bin/env python
"""Channels-last (NHWC) against NCHW memory for the models the builders return: one training step and
one prediction pass per batch, the same weights and inputs, float32 and (where the CPU does it in
hardware, or on a GPU) bfloat16 autocast, timed here in one process (``bench_score._timed``). Prints
seconds per pass and the ratio NCHW ÷ NHWC (above 1: channels-last is faster).

    .venv/bin/python scripts/bench_layout.py [--threads 1] [--batch 8] [--size 128] [--repeats 5]
"""

from __future__ import annotations

import argparse

import torch
from bench_score import _timed  # this folder is on the path of a script run from it


def _unet_step(model, x, targets):
    return sum(model(list(x), targets).values())


def _cnn_step(model, x, targets):
    return torch.nn.functional.cross_entropy(model(x), targets)


def cases(size: int, batch: int, dev: torch.device):
    """(name, builder, step(model, x, targets) → loss, predict(model, x), targets on ``dev``) per model."""
    from msc_ray import models

    masks = torch.zeros(6, size, size, dtype=torch.uint8, device=dev)
    for k in range(3):  # three cells with a nucleus each: the U-Net builds its six maps from them
        y0 = 10 + 30 * k
        masks[k, y0 : y0 + 20, 10 : size - 10] = 1
        masks[3 + k, y0 + 6 : y0 + 14, size // 2 - 4 : size // 2 + 4] = 1
    seg_targets = [{"masks": masks, "labels": torch.tensor([1, 1, 1, 2, 2, 2], device=dev)} for _ in range(batch)]
    labels = torch.randint(0, 4, (batch,), generator=torch.Generator().manual_seed(0)).to(dev)
    return [
        (
            "unet (segmenter)",
            lambda: models.build_segmenter("unet", image_size=size),
            _unet_step,
            lambda m, x: m.maps(x),
            seg_targets,
        ),
        (
            "compact_cnn (classifier)",
            lambda: models.build_classifier("compact_cnn", 4, image_size=size),
            _cnn_step,
            lambda m, x: m(x),
            labels,
        ),
    ]


def one_pass(model, what: str, precision: str, step, predict, x, targets):
    """A no-argument function running one training step or one prediction pass of ``model`` on ``x``."""
    amp = dict(device_type=x.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    if what == "prediction":
        model.eval()

        def run():
            with torch.no_grad(), torch.autocast(**amp):
                predict(model, x)

        return run
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)

    def run():
        with torch.autocast(**amp):
            loss = step(model, x, targets)
        opt.zero_grad(set_to_none=True)
        loss.float().backward()
        opt.step()

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    from msc_ray import engine

    torch.set_num_threads(args.threads)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precisions = ["fp32"] + (["bf16"] if engine.use_bf16(dev, "auto") else [])
    x = torch.rand(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(1)).to(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    print(f"{dev.type}, {args.threads} thread(s), batch {args.batch}, {args.size} px; mean of {args.repeats}")
    print("| model | pass | precision | NCHW s | NHWC s | NCHW ÷ NHWC |")
    print("|---|---|---|---|---|---|")
    for name, build, step, predict, targets in cases(args.size, args.batch, dev):
        torch.manual_seed(0)
        nhwc = build().to(dev)
        nchw = build().to(dev).to(memory_format=torch.contiguous_format)
        nchw.load_state_dict(nhwc.state_dict())
        for precision in precisions:
            for what in ("train step", "prediction"):
                passes = [one_pass(m, what, precision, step, predict, x, targets) for m in (nchw, nhwc)]
                res = [_timed(run, args.repeats, sync) for run in passes]
                print(f"| {name} | {what} | {precision} | {res[0]:.3f} | {res[1]:.3f} | {res[0] / res[1]:.2f} |")


if __name__ == "__main__":
    main()
