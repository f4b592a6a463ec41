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
chosen on those out-of-fold predictions (best box-level F1) and saved in the artifact. Metrics per
fold and mean ± SD: hit rate TP/(TP+FN) and false discovery rate FP/(TP+FP) at IoU ≥ 0.5, per box and
per image (definitions in :func:`msc_ray.metrics.detection_metrics`), and mAP@0.5.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import corpus, data, metrics, models
from .config import DataConfig, from_dict

log = logging.getLogger(__name__)

NMS_CANDIDATES = (0.3, 0.4, 0.5)


@dataclass(frozen=True)
class DetectJobConfig:
    manifest: str
    out: str
    stack: str = "sstack"
    folds: tuple[int, ...] = ()  # validation folds to run; () = every fold of the manifest
    epochs: int = 10
    workers: int = 2
    gpu: bool = False
    cpus_per_worker: float = 1.0
    backbone: str = "resnet50_fpn"
    size: int = 512
    batch_size: int = 4
    lr: float = 1e-4
    weight_decay: float = 1e-4
    seed: int = 0
    max_failures: int = 2
    fail_at_epoch: int = 0  # fault injection for tests: the last rank dies once mid-way through the
    # epoch after this one (the checkpoint of this epoch is then the one to resume from)
    endpoint_url: str | None = None

    def validate(self) -> None:
        if self.backbone not in models.DETECTOR_BACKBONES:
            raise ValueError(f"--backbone must be one of {', '.join(models.DETECTOR_BACKBONES)}, got {self.backbone!r}")
        if self.workers < 1 or self.epochs < 1 or self.batch_size < 1:
            raise ValueError("--workers, --epochs and --batch-size must be at least 1")

    def data_config(self) -> DataConfig:
        # RetinaNet normalises inside its own transform: the pipeline hands it [0, 1] images
        return DataConfig(
            size=self.size,
            channels=3,
            mean=(0.0, 0.0, 0.0),
            std=(1.0, 1.0, 1.0),
            seed=self.seed,
            endpoint_url=self.endpoint_url,
            decode_batch=min(16, max(self.batch_size, 4)),
        )


def _shard(rows, seed: int, epoch: int, rank: int, world: int):
    """This rank's equal-sized slice of the epoch's seeded permutation."""
    import pyarrow as pa

    perm = np.random.default_rng([seed, epoch, 7]).permutation(rows.num_rows)
    per = rows.num_rows // world
    return rows.take(pa.array(perm[rank * per : (rank + 1) * per]))


def _inject_fault(job: DetectJobConfig, fold: int) -> None:
    """Kill this worker process once, without any clean-up (tests of FailureConfig and resume)."""
    import time

    marker = Path(job.out) / f".fault-injected-fold{fold}"
    if not marker.exists():
        marker.write_text("killed once on purpose\n")
        time.sleep(3)  # let the controller register the previous epoch's checkpoint first
        os._exit(1)


def detector_worker(config: dict) -> None:
    """Ray Train worker loop (one process per worker). ``config``: ``job`` (DetectJobConfig as a
    dict) and ``fold`` (the validation fold; -1 trains on everything)."""
    import ray.train
    import ray.train.torch

    job = from_dict(DetectJobConfig, config["job"])
    fold = int(config["fold"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    manifest = corpus.read_manifest(job.manifest, job.endpoint_url)
    rows = data.select(manifest, stack=job.stack, fold=None if fold < 0 else fold, train=True)
    if rows.num_rows < world:
        raise ValueError(f"fold {fold}: {rows.num_rows} training images for {world} workers")
    max_boxes = data.max_box_count(manifest)
    dcfg = job.data_config()
    torch.manual_seed(job.seed + fold)
    model = models.build_detector(job.backbone, image_size=job.size)
    opt = torch.optim.AdamW(model.parameters(), lr=job.lr, weight_decay=job.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=job.epochs)
    start = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(os.path.join(d, "state.pt"), map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start = int(state["epoch"])
        log.info("fold %d rank %d: resuming after epoch %d", fold, rank, start)
    model = ray.train.torch.prepare_model(model)
    device = ray.train.torch.get_device()
    epoch_times: list[float] = []
    for epoch in range(start, job.epochs):
        t_epoch = time.perf_counter()
        model.train()
        ds = data.make_dataset(
            _shard(rows, job.seed, epoch, rank, world),
            dcfg,
            train=True,
            epoch=epoch,
            detection=True,
            max_boxes=max_boxes,
        )
        stats = data.BatchStats()
        total, steps, n_boxes = 0.0, 0, 0
        for imgs, targets, _ in data.torch_batches(ds, job.batch_size, stats=stats, detection=True, keep_empty=True):
            if imgs:
                losses = model([i.to(device) for i in imgs], [{k: v.to(device) for k, v in t.items()} for t in targets])
                loss = sum(losses.values())
                n_boxes += sum(len(t["boxes"]) for t in targets)
            else:  # every image of this batch was an error record: a zero step keeps DDP in lock-step
                loss = sum(p.sum() * 0.0 for p in model.parameters())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss)
            steps += 1
            if job.fail_at_epoch and job.fail_at_epoch == epoch and rank == world - 1 and steps == 1:
                _inject_fault(job, fold)
        sched.step()
        epoch_times.append(time.perf_counter() - t_epoch)
        report = {
            "epoch": epoch + 1,
            "fold": fold,
            "loss": total / max(steps, 1),
            "images": stats.images,
            "boxes": n_boxes,
            "error_records": stats.errors,
            "resumed_from": start,
            "epoch_seconds": epoch_times[-1],
            # mean epoch time after this session's first epoch (which includes start-up)
            "mean_epoch_seconds": float(np.mean(epoch_times[1:] or epoch_times)),
        }
        if rank == 0:
            with tempfile.TemporaryDirectory() as d:
                inner = model.module if hasattr(model, "module") else model
                torch.save(
                    {
                        "model": inner.state_dict(),
                        "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(),
                        "epoch": epoch + 1,
                        "config": json.dumps(asdict(job)),
                    },
                    os.path.join(d, "state.pt"),
                )
                ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(report)


@dataclass
class FoldResult:
    fold: int
    checkpoint: str
    epochs: int
    preds: list = field(default_factory=list)  # [(boxes (k, 4), scores (k,))] per validation image
    truths: list = field(default_factory=list)  # [(m, 4)] per validation image
    rows: list = field(default_factory=list)


def _train_fold(job: DetectJobConfig, fold: int) -> tuple[str, dict]:
    """Train (or resume) one fold; returns its latest checkpoint and last reported metrics."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": job.cpus_per_worker}
    if job.gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        detector_worker,
        train_loop_config={"job": asdict(job), "fold": fold},
        scaling_config=ScalingConfig(num_workers=job.workers, use_gpu=job.gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=f"fold{fold}",
            storage_path=os.path.abspath(job.out),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=job.max_failures),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"fold {fold}: training left no checkpoint ({result.error})")
    return result.checkpoint.path, dict(result.metrics or {})


def _load(ckpt_dir: str, job: DetectJobConfig, score_thresh: float = 0.01, nms: float = max(NMS_CANDIDATES)):
    state = torch.load(os.path.join(ckpt_dir, "state.pt"), map_location="cpu", weights_only=True)
    model = models.build_detector(job.backbone, image_size=job.size, score_thresh=score_thresh, nms_thresh=nms)
    model.load_state_dict(state["model"])
    return model.eval(), int(state["epoch"])


def predict_fold(job: DetectJobConfig, fold: int, ckpt_dir: str) -> FoldResult:
    """The fold's model on its validation images: loose threshold, loosest NMS (tightened later)."""
    manifest = corpus.read_manifest(job.manifest, job.endpoint_url)
    rows = data.select(manifest, stack=job.stack, fold=fold, train=False)
    model, epochs = _load(ckpt_dir, job)
    res = FoldResult(fold=fold, checkpoint=ckpt_dir, epochs=epochs)
    ds = data.make_dataset(rows, job.data_config(), train=False, detection=True, max_boxes=data.max_box_count(manifest))
    with torch.inference_mode():
        for imgs, targets, r in data.torch_batches(ds, job.batch_size * 2, detection=True):
            for out, t in zip(model(imgs), targets, strict=True):
                res.preds.append((out["boxes"].numpy(), out["scores"].numpy()))
                res.truths.append(t["boxes"].numpy())
            res.rows.extend(r.tolist())
    return res


def _apply_nms(preds, iou: float):
    from torchvision.ops import nms

    out = []
    for boxes, scores in preds:
        keep = nms(torch.as_tensor(boxes), torch.as_tensor(scores), iou).numpy() if len(boxes) else np.zeros(0, int)
        out.append((boxes[keep], scores[keep]))
    return out


def choose_operating_point(results: list[FoldResult]) -> dict:
    """NMS IoU and score threshold with the best box-level F1 over all out-of-fold predictions."""
    truths = [t for r in results for t in r.truths]
    best = {"f1": -1.0, "nms_iou": max(NMS_CANDIDATES), "score_threshold": 0.5}
    for iou in NMS_CANDIDATES:
        preds = _apply_nms([p for r in results for p in r.preds], iou)
        all_scores = np.concatenate([s for _, s in preds]) if preds else np.zeros(0)
        cands = np.unique(np.quantile(all_scores, np.linspace(0, 0.99, 60))) if len(all_scores) else [0.5]
        for th in cands:
            m = metrics.detection_metrics(preds, truths, float(th))
            f1 = 2 * m["tp"] / max(2 * m["tp"] + m["fp"] + m["fn"], 1)
            if f1 > best["f1"]:
                best = {"f1": f1, "nms_iou": iou, "score_threshold": float(th)}
    return best


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


def train_detector(job: DetectJobConfig) -> dict:
    """Train every fold, evaluate, choose the operating point, write Table 2 and the artifact."""
    job.validate()
    manifest = corpus.read_manifest(job.manifest, job.endpoint_url)
    info = corpus.manifest_info(manifest)
    folds = list(job.folds) or list(range(int(info["folds"])))
    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for fold in folds:
        ckpt, last = _train_fold(job, fold)
        log.info("fold %d: %s, checkpoint %s", fold, last, ckpt)
        results.append(predict_fold(job, fold, ckpt))
    op = choose_operating_point(results)
    rows = []
    for r in results:
        preds = _apply_nms(r.preds, op["nms_iou"])
        m = metrics.detection_metrics(preds, r.truths, op["score_threshold"])
        rows.append(
            {
                "fold": r.fold,
                "epochs": r.epochs,
                "images": len(r.truths),
                "abnormal_cells": int(sum(len(t) for t in r.truths)),
                **m,
                "map50": metrics.average_precision(preds, r.truths),
            }
        )
    keys = ("hit_rate", "fdr", "image_hit_rate", "image_fdr", "map50")
    summary = {k: metrics.mean_sd([r[k] for r in rows]) for k in keys}
    metrics.write_csv(rows, out / "metrics.csv")
    md = [
        "| fold | images | cells | hit rate (box) | FDR (box) | hit rate (image) | FDR (image) | mAP@0.5 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        md.append(
            f"| {r['fold']} | {r['images']} | {r['abnormal_cells']} | {r['hit_rate']:.3f} | {r['fdr']:.3f} | "
            f"{r['image_hit_rate']:.3f} | {r['image_fdr']:.3f} | {r['map50']:.3f} |"
        )
    md.append("| mean ± SD | | | " + " | ".join(f"{summary[k][0]:.3f} ± {summary[k][1]:.3f}" for k in keys) + " |")
    md.append("")
    md.append(
        f"Operating point chosen on the validation folds: NMS IoU {op['nms_iou']}, score threshold "
        f"{op['score_threshold']:.3f} (box-level F1 {op['f1']:.3f}). Matching at IoU ≥ 0.5."
    )
    (out / "metrics.md").write_text("\n".join(md) + "\n")
    panel = _panel(job, results, op, out / "predictions.png")
    best = max(
        results, key=lambda r: -1 if math.isnan(rows[results.index(r)]["map50"]) else rows[results.index(r)]["map50"]
    )
    state = torch.load(os.path.join(best.checkpoint, "state.pt"), map_location="cpu", weights_only=True)["model"]
    art = models.save_artifact(
        out / "artifact",
        state,
        {
            "kind": "detector",
            "architecture": job.backbone,
            "classes": ["Flatten"],
            "image_size": job.size,
            "score_threshold": op["score_threshold"],
            "nms_iou": op["nms_iou"],
            "stack": job.stack,
            "trained_on": f"every fold but {best.fold} (the fold with the best validation mAP@0.5)",
            "metrics": {k: {"mean": summary[k][0], "sd": summary[k][1]} for k in keys},
            "run": {"out": str(out.resolve()), "manifest": job.manifest, "epochs": best.epochs},
        },
    )
    result = {
        "table_csv": str(out / "metrics.csv"),
        "table_md": str(out / "metrics.md"),
        "panel": panel,
        "artifact": str(out / "artifact"),
        "operating_point": op,
        "folds": rows,
        "summary": {k: {"mean": summary[k][0], "sd": summary[k][1]} for k in keys},
        "artifact_version": art["version"],
    }
    (out / "summary.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    return result
