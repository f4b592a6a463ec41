"""One outer fold on Ray Train: the DDP worker loop around :class:`DetectorRun` and the
``TorchTrainer`` that runs it."""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict

import numpy as np
import torch

from .. import engine, signal_handlers_kept, storage
from .job import DetectJobConfig, _inject_fault, job_from

log = logging.getLogger(__name__)


def _stop_together(stop: bool, device) -> bool:
    """Rank 0's early-stopping decision, shared with every rank (all stop at the same epoch)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return stop
    flag = torch.tensor([1.0 if stop else 0.0], device=device)
    dist.broadcast(flag, src=0)
    return bool(flag.item())


class DetectorRun:
    """What one DDP worker trains for one outer fold (see :func:`detector_worker`); resumable. The
    model is wrapped for DDP by the caller (``wrap``); rank 0 scores the inner validation part."""

    def __init__(
        self,
        job: DetectJobConfig,
        fold: int,
        folds: int,
        cache: engine.Cache,
        anchors: dict,
        rank: int = 0,
        world: int = 1,
    ):
        self.job, self.fold, self.rank, self.world, self.anchors = job, fold, rank, world, anchors
        self.train, self.val, _ = cache.split(fold, folds)
        self.val = self.val.centre_crop(job.crop)  # early stopping's part at the training crop's side
        if len(self.train) < world:
            raise ValueError(f"fold {fold}: {len(self.train)} training images for {world} workers")
        dcfg = job.data_config()
        torch.manual_seed(job.seed + fold)
        self.model = job.build_model(anchors)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=job.lr, weight_decay=job.weight_decay)
        steps = max(-(-(len(self.train) // world) // job.batch_size), 1)
        self.sched = engine.warmup_cosine(self.opt, job.epochs * steps, steps)
        self.stopper = engine.EarlyStopping(job.patience)
        self.aug_train = engine.Augmenter(dcfg, train=True, boxes=True, crop=job.crop)
        self.aug_eval = engine.Augmenter(dcfg, train=False, boxes=True)
        self.start = 0
        self.ddp, self.device = self.model, torch.device("cpu")

    def restore(self, ckpt) -> None:
        if ckpt is None:
            return
        with ckpt.as_directory() as d:
            saved = torch.load(os.path.join(d, "state.pt"), map_location="cpu", weights_only=True)
        self.model.load_state_dict(saved["model"])
        self.opt.load_state_dict(saved["optimizer"])
        self.sched.load_state_dict(saved["scheduler"])
        self.stopper.load_state_dict(saved["stopper"])
        self.start = int(saved["epoch"])
        log.info("fold %d rank %d: resuming after epoch %d", self.fold, self.rank, self.start)

    def wrap(self, ddp_model, device) -> None:
        self.ddp, self.device = ddp_model, device
        self.model = ddp_model.module if hasattr(ddp_model, "module") else ddp_model

    @property
    def bf16(self) -> bool:
        """Whether this rank's training steps run under bfloat16 autocast, on the device it trains on."""
        return engine.use_bf16(self.device, self.job.precision)

    def run_epoch(self, epoch: int, on_step=None) -> dict:
        """Train this rank's slice; rank 0 scores the inner validation fold (mAP@0.5) and updates the
        early-stopping state. Returns the epoch's metrics (``stop`` only meaningful on rank 0)."""
        job = self.job
        stats = engine.train_detector_epoch(
            self.ddp,
            self.train,
            self.aug_train,
            self.opt,
            self.sched,
            epoch=epoch,
            batch_size=job.batch_size,
            device=self.device,
            rank=self.rank,
            world=self.world,
            seed=job.seed,
            on_step=on_step,
            clip=job.grad_clip,
            bf16=self.bf16,
        )
        report = {
            "epoch": epoch + 1,
            "fold": self.fold,
            "loss": stats["loss"],
            "images": stats["images"],
            "boxes": stats["boxes"],
            "bf16": self.bf16,
            "resumed_from": self.start,
        }
        warm = epoch + 1 >= (job.min_epochs or job.epochs // 2)
        if self.rank == 0 and warm:
            val_map = 0.0
            if len(self.val):
                val_map = job.validation_score(self.model, self.val, self.aug_eval, self.device)
                val_map = -1.0 if math.isnan(val_map) else val_map
            self.stopper.update(val_map, epoch + 1, self.model)
            report["val_map50"] = val_map
        report.update(best_epoch=self.stopper.best_epoch, best_val_map50=self.stopper.best)
        return report

    def save(self, folder: str, epoch: int) -> None:
        torch.save(
            {
                "model": self.model.state_dict(),
                "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(),
                "stopper": self.stopper.state_dict(),
                "best_model": self.stopper.best_state,
                "best_epoch": self.stopper.best_epoch,
                "best_map": self.stopper.best,
                "anchors": json.dumps(self.anchors),
                "config": json.dumps(asdict(self.job)),
                "epoch": epoch + 1,
            },
            os.path.join(folder, "state.pt"),
        )


def detector_worker(config: dict) -> None:
    """Ray Train worker loop: a thin wrapper around :class:`DetectorRun` (which calls
    :func:`engine.train_detector_epoch`).

    ``config``: ``job`` (DetectJobConfig as a dict), ``fold`` (the outer fold), ``folds``, ``cache``
    (an ObjectRef of the decoded :class:`engine.Cache`), ``anchors``. The outer fold is never seen;
    rank 0 scores the inner validation fold after every epoch (mAP@0.5) for early stopping, keeps the
    best epoch's weights in the checkpoint, and every rank stops at the same epoch."""
    import ray
    import ray.train
    import ray.train.torch

    job = job_from(config)
    fold = int(config["fold"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    run = DetectorRun(job, fold, int(config["folds"]), ray.get(config["cache"]), config["anchors"], rank, world)
    run.restore(ray.train.get_checkpoint())
    run.wrap(ray.train.torch.prepare_model(run.model), ray.train.torch.get_device())
    epoch_times: list[float] = []
    for epoch in range(run.start, job.epochs):
        t0 = time.perf_counter()

        def maybe_fail(step: int, epoch=epoch) -> None:
            if job.fail_at_epoch and job.fail_at_epoch == epoch and rank == world - 1 and step == 1:
                _inject_fault(job, fold)

        report = run.run_epoch(epoch, on_step=maybe_fail)
        stop = _stop_together(rank == 0 and run.stopper.best_epoch > 0 and run.stopper.stop, run.device)
        epoch_times.append(time.perf_counter() - t0)
        # mean epoch time after this session's first epoch (which includes start-up)
        report.update(
            stopped_early=stop,
            epoch_seconds=epoch_times[-1],
            mean_epoch_seconds=float(np.mean(epoch_times[1:] or epoch_times)),
        )
        if rank == 0:
            with tempfile.TemporaryDirectory() as d:
                run.save(d, epoch)
                ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(report)
        if stop:
            break


def _train_fold(job: DetectJobConfig, fold: int, folds: int, cache_ref, anchors: dict) -> tuple[str, dict]:
    """Train (or resume) one fold; returns its latest checkpoint and last reported metrics."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage_path, fs = storage.ray_storage(job.out, job.endpoint_url)
    resources = {"CPU": job.cpus_per_worker}
    if job.gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        detector_worker,
        train_loop_config={
            "job": asdict(job),
            "kind": job.kind,
            "fold": fold,
            "folds": folds,
            "cache": cache_ref,
            "anchors": anchors,
        },
        scaling_config=ScalingConfig(
            num_workers=job.workers,
            use_gpu=job.gpu,
            resources_per_worker=resources,
            placement_strategy=job.placement,
        ),
        run_config=RunConfig(
            name=f"fold{fold}",
            storage_path=storage_path,
            storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=job.max_failures),
        ),
    )
    with signal_handlers_kept():  # Ray Train's Ctrl-C handler would outlive the fit
        result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"fold {fold}: training left no checkpoint ({result.error})")
    return result.checkpoint.path, dict(result.metrics or {})


def log_fold(fold: int, last: dict, score: str) -> bool:
    """Log how a fold's training ended (``last``: its last reported metrics; ``score``: what early
    stopping followed); returns whether its training steps ran under bfloat16 autocast."""
    bf16 = bool(last.get("bf16", False))
    log.info(
        "fold %d: %d epochs, best %d (%s %.3f), bf16 %s",
        fold,
        last.get("epoch", 0),
        last.get("best_epoch", 0),
        score,
        last.get("best_val_map50", float("nan")),
        bf16,
    )
    return bf16
