"""Abnormal-cell detector: torchvision RetinaNet trained with Ray Train (``TorchTrainer``, DDP).

One ``TorchTrainer`` run per validation fold under ``RUN/fold<k>``. Each of the N workers streams
its own Ray Data shard of the training images (a disjoint, equal-sized slice of the epoch's seeded
permutation, re-augmented every epoch with the box-aware recipe), so DDP steps stay in lock-step.
Images without abnormal cells are kept as negatives (empty targets): the model learns to say "none".

Rank 0 writes a checkpoint every epoch (model, optimizer, scheduler, epoch, config). ``FailureConfig``
restarts a failed worker group from the latest checkpoint, and rerunning the same command with the
same ``--out`` resumes each fold from its latest checkpoint (Ray Train V2 picks it up from the run's
storage path and name); finished folds are not trained again.

After training, every fold's model scores its validation images; the NMS IoU and score threshold are
chosen on those out-of-fold predictions (the loosest threshold whose FDR stays within ``max_fdr``) and
saved in the artifact. Metrics per
fold and mean ± SD: hit rate TP/(TP+FN) and false discovery rate FP/(TP+FP) at IoU ≥ 0.5, per box and
per image (definitions in :func:`msc_ray.metrics.detection_metrics`), and mAP@0.5.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from . import corpus, data, engine, metrics, models, signal_handlers_kept, storage
from .config import DataConfig, from_dict

log = logging.getLogger(__name__)

NMS_CANDIDATES = (0.3, 0.4, 0.5)


@dataclass(frozen=True)
class DetectJobConfig:
    kind: ClassVar[str] = "detector"  # the Ray Train worker rebuilds the job from this (see job_from)
    backbones: ClassVar[tuple[str, ...]] = models.DETECTOR_BACKBONES

    manifest: str
    out: str
    stack: str = "sstack"
    folds: tuple[int, ...] = ()  # validation folds to run; () = every fold of the manifest
    epochs: int = 30  # at most: early stopping on the inner validation fold's mAP@0.5
    patience: int = 6
    min_epochs: int = 0  # no validation nor stopping before this epoch; 0: half of --epochs (detectors
    # learn little in their first epochs, then fast: stopping during that plateau stops them for good)
    workers: int = 2
    gpu: bool = False
    cpus_per_worker: float = 1.0
    max_fdr: float = 0.02  # the operating point: the loosest threshold whose inner-validation FDR stays within
    placement: str = "PACK"  # PACK: workers share nodes where they fit; SPREAD: one node each where it can
    backbone: str = "compact_fpn"
    size: int = 128  # abnormal cells are large: 128 px keeps them 20–50 px across
    batch_size: int = 4  # small batches: more steps per epoch (measured: found cells by epoch 10, not 20)
    lr: float = 1e-3
    grad_clip: float = 10.0  # gradient-norm cap
    weight_decay: float = 1e-4
    tilt_share: float = 0.5  # share of training samples rotated by a small angle too (augment.RotateCrop)
    seed: int = 0
    # training steps under bfloat16 autocast (engine.use_bf16: auto = a GPU, or a CPU that does bf16 in
    # hardware); inner validation, outer folds and exports are read in float32, as scoring reads them on CPUs
    precision: str = "auto"
    max_failures: int = 2
    fail_at_epoch: int = 0  # fault injection for tests: the last rank dies once mid-way through the
    # epoch after this one (the checkpoint of this epoch is then the one to resume from)
    endpoint_url: str | None = None

    def validate(self) -> None:
        if self.backbone not in self.backbones:
            raise ValueError(f"--backbone must be one of {', '.join(self.backbones)}, got {self.backbone!r}")
        if self.placement not in ("PACK", "SPREAD"):
            raise ValueError(f"--placement must be PACK or SPREAD, got {self.placement!r}")
        if self.workers < 1 or self.epochs < 1 or self.batch_size < 1:
            raise ValueError("--workers, --epochs and --batch-size must be at least 1")
        engine.check_precision(self.precision)

    def build_model(self, anchors: dict, **kwargs) -> torch.nn.Module:
        return models.build_detector(self.backbone, image_size=self.size, anchors=anchors, **kwargs)

    def validation_score(self, model, val: engine.Cache, aug: engine.Augmenter, device) -> float:
        """What early stopping follows on the inner validation part: mAP@0.5 (NaN: nothing to find)."""
        preds, truths = engine.predict_detections(model, val, aug, batch_size=self.batch_size * 2, device=device)
        return engine.detection_map(preds, truths)

    def data_config(self) -> DataConfig:
        # RetinaNet normalises inside its own transform: the pipeline hands it [0, 1] images
        return DataConfig(
            size=self.size,
            channels=3,
            mean=(0.0, 0.0, 0.0),
            std=(1.0, 1.0, 1.0),
            tilt_share=self.tilt_share,
            seed=self.seed,
            endpoint_url=self.endpoint_url,
        )


def _inject_fault(job: DetectJobConfig, fold: int) -> None:
    """Kill this worker process once, without any clean-up (tests of FailureConfig and resume)."""
    marker = Path(job.out) / f".fault-injected-fold{fold}"
    if not marker.exists():
        marker.write_text("killed once on purpose\n")
        time.sleep(3)  # let the controller register the previous epoch's checkpoint first
        os._exit(1)


def detection_rows(manifest, stack: str):
    """Rows the detector may learn from: images whose annotation parsed (``ok``). A missing or
    malformed XML says nothing about the image's cells, so it must not train as "no abnormal cell"."""
    import pyarrow.compute as pc

    rows = data.select(manifest, stack=stack)
    good = rows.filter(pc.equal(rows["annotation"], "ok"))
    left = rows.num_rows - good.num_rows
    if left:
        log.warning("detector: %d %s image(s) without a usable annotation left out", left, stack)
    if good.num_rows == 0:
        raise ValueError(f"no {stack} image has a usable Pascal VOC annotation")
    return good


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
        if len(self.train) < world:
            raise ValueError(f"fold {fold}: {len(self.train)} training images for {world} workers")
        dcfg = job.data_config()
        torch.manual_seed(job.seed + fold)
        self.model = job.build_model(anchors)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=job.lr, weight_decay=job.weight_decay)
        steps = max(-(-(len(self.train) // world) // job.batch_size), 1)
        self.sched = engine.warmup_cosine(self.opt, job.epochs * steps, steps)
        self.stopper = engine.EarlyStopping(job.patience)
        self.aug_train = engine.Augmenter(dcfg, train=True, boxes=True)
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


def job_from(config: dict) -> DetectJobConfig:
    """The job of a worker's ``train_loop_config``: a detector's, or a segmenter's (``kind``)."""
    cls = DetectJobConfig
    if config.get("kind") == "segmenter":
        from .segment import SegmentJobConfig as cls
    return from_dict(cls, config["job"])


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


@dataclass
class FoldResult:
    fold: int
    checkpoint: str
    epochs: int
    best_epoch: int
    best_val_map: float
    val_preds: list = field(default_factory=list)  # inner validation: the operating point is chosen here
    val_truths: list = field(default_factory=list)
    preds: list = field(default_factory=list)  # outer fold: [(boxes (k, 4), scores (k,))] per image
    truths: list = field(default_factory=list)  # [(m, 4)] per outer-fold image
    rows: list = field(default_factory=list)


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


def _device(job: DetectJobConfig) -> torch.device:
    return torch.device("cuda" if job.gpu and torch.cuda.is_available() else "cpu")


def _read_state(job: DetectJobConfig, ckpt_dir: str) -> dict:
    """A fold checkpoint's ``state.pt`` (a path in the run's storage: local, or ``bucket/key`` on S3)."""
    import io

    raw = storage.read_checkpoint_file(job.out, ckpt_dir, "state.pt", job.endpoint_url)
    if raw is None:
        raise FileNotFoundError(f"{ckpt_dir}: no state.pt in this checkpoint")
    return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)


def load_best(ckpt_dir: str, job: DetectJobConfig, **kwargs):
    """The best epoch's model of a fold checkpoint (``job.build_model`` with the checkpoint's anchors
    and ``kwargs``), in eval mode on the job's device, and the checkpoint's state."""
    state = _read_state(job, ckpt_dir)
    model = job.build_model(json.loads(state["anchors"]), **kwargs)
    model.load_state_dict(state["best_model"] or state["model"])
    return model.eval().to(_device(job)), state


def predict_fold(job: DetectJobConfig, fold: int, folds: int, ckpt_dir: str, cache) -> FoldResult:
    """The fold's best model on its inner validation part and on its outer fold."""
    _, val, test = cache.split(fold, folds)
    # a loose threshold and the loosest NMS, both tightened later at the operating point
    model, state = load_best(ckpt_dir, job, score_thresh=0.01, nms_thresh=max(NMS_CANDIDATES))
    aug = engine.Augmenter(job.data_config(), train=False, boxes=True)
    dev = _device(job)
    vp, vt = engine.predict_detections(model, val, aug, batch_size=job.batch_size * 2, device=dev)
    tp, tt = engine.predict_detections(model, test, aug, batch_size=job.batch_size * 2, device=dev)
    return FoldResult(
        fold=fold,
        checkpoint=ckpt_dir,
        epochs=int(state["epoch"]),
        best_epoch=int(state["best_epoch"]),
        best_val_map=float(state["best_map"]),
        val_preds=vp,
        val_truths=vt,
        preds=tp,
        truths=tt,
        rows=test.rows.tolist(),
    )


def _apply_nms(preds, iou: float):
    from torchvision.ops import nms

    out = []
    for boxes, scores in preds:
        keep = nms(torch.as_tensor(boxes), torch.as_tensor(scores), iou).numpy() if len(boxes) else np.zeros(0, int)
        out.append((boxes[keep], scores[keep]))
    return out


def _candidates(kept: list, floor: float = 0.05, n: int = 200) -> np.ndarray:
    """Score thresholds to try, strictest first: the predictions' own scores above ``floor`` (at most
    ``n`` of them, evenly spaced in rank), so the grid is fine where the true boxes' scores are."""
    scores = np.concatenate([s for _, s in kept]) if kept else np.zeros(0)
    scores = np.unique(scores[scores >= floor])[::-1]
    if len(scores) > n:
        scores = scores[np.linspace(0, len(scores) - 1, n).round().astype(int)]
    return scores if len(scores) else np.array([0.5])


def choose_operating_point(preds: list, truths: list, max_fdr: float = 0.02) -> dict:
    """NMS IoU and score threshold, on the given predictions (the inner validation folds': the outer
    folds that Table 2 reports are not used). When the best-F1 point already keeps the false discovery
    rate within ``max_fdr``, the loosest threshold that still does: as many abnormal cells found as the
    budget allows (a missed abnormal cell costs more in QC than a box a person dismisses), across NMS
    settings the highest hit rate. The margin below the validation boxes' scores is kept on purpose: new
    vessels score their cells lower. A detector not that precise gets its best-F1 point."""
    points = []
    for iou in NMS_CANDIDATES:
        kept = _apply_nms(preds, iou)
        for th in _candidates(kept):
            m = metrics.detection_metrics(kept, truths, float(th))
            f1 = 2 * m["tp"] / max(2 * m["tp"] + m["fp"] + m["fn"], 1)
            hit = 0.0 if math.isnan(m["hit_rate"]) else m["hit_rate"]
            fdr = 0.0 if math.isnan(m["fdr"]) else m["fdr"]  # nothing predicted: no false discovery
            points.append({"f1": f1, "hit_rate": hit, "fdr": fdr, "nms_iou": iou, "score_threshold": float(th)})
    best_f1 = max(points, key=lambda q: (q["f1"], q["score_threshold"]))
    if best_f1["fdr"] > max_fdr:
        return {**best_f1, "max_fdr": max_fdr, "rule": "best F1 (its FDR is above the budget)"}
    within = [q for q in points if q["fdr"] <= max_fdr]
    best = max(within, key=lambda q: (q["hit_rate"], -q["score_threshold"]))
    return {**best, "max_fdr": max_fdr, "rule": "loosest threshold within the FDR budget"}


def _panel(job: DetectJobConfig, results: list[FoldResult], op: dict, dest: Path, n: int = 8) -> str:
    """Validation images with truth (green) and predictions at the operating point (red)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    manifest = corpus.read_manifest(job.manifest, job.endpoint_url)
    uris, paths = manifest.column("uri").to_pylist(), manifest.column("path").to_pylist()
    picks = [(r, i) for r in results for i in range(len(r.rows)) if len(r.truths[i])][: n // 2]
    picks += [(r, i) for r in results for i in range(len(r.rows)) if not len(r.truths[i])][: n - len(picks)]
    cols = 4
    fig, axes = plt.subplots(
        math.ceil(len(picks) / cols) or 1, cols, figsize=(3.2 * cols, 3.4 * math.ceil(len(picks) / cols))
    )
    axes = np.atleast_1d(axes).ravel()
    from torchvision.transforms.v2 import functional as F

    for ax, (r, i) in zip(axes, picks, strict=False):
        row = r.rows[i]
        img = data.load_image(uris[row], paths[row], DataConfig(channels=1))
        img = F.resize(torch.from_numpy(img), [job.size, job.size], antialias=True)[0].numpy()
        ax.imshow(img, cmap="gray")
        for b in r.truths[i]:
            ax.add_patch(Rectangle((b[0], b[1]), b[2] - b[0], b[3] - b[1], fill=False, ec="lime", lw=1.5))
        ((boxes, scores),) = _apply_nms([r.preds[i]], op["nms_iou"])
        for b, s in zip(boxes, scores, strict=True):
            if s >= op["score_threshold"]:
                ax.add_patch(Rectangle((b[0], b[1]), b[2] - b[0], b[3] - b[1], fill=False, ec="red", lw=1))
        ax.set_title(f"fold {r.fold}: {len(r.truths[i])} true", fontsize=8)
        ax.axis("off")
    for ax in axes[len(picks) :]:
        ax.axis("off")
    fig.suptitle("abnormal cells: truth (green) vs predictions (red)")
    fig.tight_layout()
    fig.savefig(dest, dpi=100)
    plt.close(fig)
    return str(dest)


def _table(results: list[FoldResult], op: dict) -> tuple[list[dict], dict]:
    rows = []
    for r in results:
        preds = _apply_nms(r.preds, op["nms_iou"])
        m = metrics.detection_metrics(preds, r.truths, op["score_threshold"])
        rows.append(
            {
                "fold": r.fold,
                "epochs": r.epochs,
                "best_epoch": r.best_epoch,
                "images": len(r.truths),
                "abnormal_cells": int(sum(len(t) for t in r.truths)),
                **m,
                "map50": metrics.average_precision(preds, r.truths),
            }
        )
    summary = {k: metrics.mean_sd([r[k] for r in rows]) for k in TABLE2_KEYS}
    return rows, summary


TABLE2_KEYS = ("hit_rate", "fdr", "image_hit_rate", "image_fdr", "map50")


def _write_table2(rows: list[dict], summary: dict, op: dict, out: Path) -> None:
    metrics.write_csv(rows, out / "metrics.csv")
    md = metrics.fold_table_md(
        [{**r, "epochs_best": f"{r['epochs']} ({r['best_epoch']})"} for r in rows],
        ["fold", "epochs_best", "images", "abnormal_cells"],
        TABLE2_KEYS,
        summary,
        "| fold | epochs (best) | images | cells | hit rate (box) | FDR (box) | hit rate (image) | FDR (image) "
        "| mAP@0.5 |",
    )
    md += [
        "",
        f"Outer folds: no image of a fold's row was trained on or used to choose anything. Early stopping "
        f"(mAP@0.5) and the operating point used the inner validation folds: NMS IoU {op['nms_iou']}, score "
        f"threshold {op['score_threshold']:.3f} ({op['rule']}, FDR ≤ {op['max_fdr']:.2f}; inner hit rate "
        f"{op['hit_rate']:.3f}, box-level F1 {op['f1']:.3f}). Matching at IoU ≥ 0.5. "
        "n/a: undefined (FDR where nothing was predicted; hit rate where there was nothing to find), never 0.",
    ]
    (out / "metrics.md").write_text("\n".join(md) + "\n")


def _export(job: DetectJobConfig, out: Path, results: list[FoldResult], op: dict, summary: dict) -> dict:
    """The artifact: the fold model with the best inner-validation mAP@0.5 (not chosen on the outer
    folds), with the operating point and the anchors it was trained with."""
    keys = TABLE2_KEYS
    best = max(results, key=lambda r: r.best_val_map)  # chosen on inner validation, not on the outer folds
    saved = _read_state(job, best.checkpoint)
    state = saved["best_model"] or saved["model"]
    return models.save_artifact(
        storage.join(job.out, "artifact"),
        state,
        {
            "kind": "detector",
            "architecture": job.backbone,
            "classes": ["Flatten"],
            "image_size": job.size,
            "score_threshold": op["score_threshold"],
            "nms_iou": op["nms_iou"],
            "anchors": json.loads(saved["anchors"]),
            "stack": job.stack,
            "trained_on": f"folds other than {best.fold} and its inner validation fold (best inner mAP@0.5)",
            "metrics": {k: {"mean": summary[k][0], "sd": summary[k][1]} for k in keys},
            "run": {"out": job.out, "manifest": job.manifest, "epochs": best.best_epoch},
        },
        endpoint_url=job.endpoint_url,
    )


def prepare_run(job: DetectJobConfig) -> tuple:
    """What a per-fold Ray Train run (detector or segmenter) checks and sets up before any work.
    Returns ``(job with absolute paths, manifest, number of folds (≥ 3: nested evaluation), folds to
    run, local output folder, whether --out is s3://)``; the tables, panel and summary are written to
    the local folder, then copied to --out when that is s3://. ``--out`` is checked writable and seen
    by every node."""
    job.validate()
    job = replace(job, manifest=storage.absolute(job.manifest), out=storage.absolute(job.out))
    manifest = corpus.read_manifest(job.manifest, job.endpoint_url)
    n_folds = int(corpus.manifest_info(manifest)["folds"])
    if n_folds < 3:
        raise ValueError(f"{job.manifest}: {n_folds} folds; nested evaluation needs at least 3")
    storage.check_writable(job.out, job.endpoint_url)
    first = manifest.column("uri")[0].as_py() if manifest.num_rows else ""
    storage.ensure_shared({"--out": job.out, "the manifest": job.manifest, "the corpus (first image)": first})
    remote = storage.is_s3(job.out)
    out = Path(tempfile.mkdtemp(prefix=f"msc-ray-{job.kind}-") if remote else job.out)
    out.mkdir(parents=True, exist_ok=True)
    return job, manifest, n_folds, list(job.folds) or list(range(n_folds)), out, remote


def train_detector(job: DetectJobConfig) -> dict:
    """Decode once, train every outer fold on Ray Train, choose the operating point on the inner
    validation folds, write Table 2 (outer folds), the panel and the artifact."""
    import ray

    job, manifest, n_folds, folds, out, remote = prepare_run(job)
    cache = data.build_cache(detection_rows(manifest, job.stack), job.data_config(), detection=True)
    for e in cache.errors:
        log.warning("left out: %s", e)
    cache_ref = ray.put(cache)
    results, bf16 = [], {}  # per fold: whether its training steps ran under bfloat16 autocast
    for fold in folds:
        anchors = engine.anchor_plan(cache.split(fold, n_folds)[0].boxes, models.DETECTOR_LEVELS[job.backbone])
        ckpt, last = _train_fold(job, fold, n_folds, cache_ref, anchors)
        bf16[fold] = log_fold(fold, last, "inner mAP@0.5")
        results.append(predict_fold(job, fold, n_folds, ckpt, cache))
    op = choose_operating_point(
        [p for r in results for p in r.val_preds], [t for r in results for t in r.val_truths], job.max_fdr
    )
    rows, summary = _table(results, op)
    _write_table2(rows, summary, op, out)
    keys = TABLE2_KEYS
    panel = _panel(job, results, op, out / "predictions.png")
    art = _export(job, out, results, op, summary)
    result = {
        "table_csv": storage.join(job.out, "metrics.csv"),
        "table_md": storage.join(job.out, "metrics.md"),
        "panel": storage.join(job.out, Path(panel).name),
        "artifact": storage.join(job.out, "artifact"),
        "operating_point": op,
        "folds": rows,
        "summary": {k: {"mean": summary[k][0], "sd": summary[k][1]} for k in keys},
        "artifact_version": art["version"],
        "bf16": bf16,
        "left_out": list(cache.errors),  # images that could not be read: never in any rank's batches
    }
    (out / "summary.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    if remote:
        storage.upload_dir(out, job.out, job.endpoint_url)
        shutil.rmtree(out, ignore_errors=True)
    return result
