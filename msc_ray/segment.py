"""Cell and nucleus instance segmentation trained with Ray Train (DDP): a U-Net whose cell and
nucleus maps seeded watershed splits into instances (default, :class:`msc_ray.models.UNetWatershed`),
or torchvision's Mask R-CNN.

The detector's machinery (:mod:`msc_ray.detect`) with another model and other targets: images and
their cell and nucleus instance masks (``masks/<stack>/<stem>.png``, ``masks/<stack>/nuclei/<stem>.png``)
are decoded and resized once (Ray Data tasks) and shared through Ray's object store; one
``TorchTrainer`` run per outer fold under ``RUN/fold<k>`` with N DDP workers, each training on its
equal slice of the epoch's seeded permutation with the study's geometric and photometric
augmentations (the instance maps follow the geometry, nearest neighbour). Rank 0 checkpoints every
epoch and scores the inner validation fold (mean of the cell and nucleus box AP@0.5) for early
stopping; a rerun with the same ``--out`` resumes.

Reported per outer fold (nothing of it trained, stopped or chose a threshold): mask AP@0.5 and
AP@[.5:.95] per class (torchmetrics' COCO evaluation, pycocotools backend), the mean relative
counting error of cells and nuclei, and the MAE of mask-based confluence against the true
confluence. The per-class score thresholds for counting are chosen on the inner validation folds.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from . import check_views, data, engine, metrics, models, storage
from .detect import DetectJobConfig, _device, _read_state, _train_fold, load_best, log_fold, prepare_run

log = logging.getLogger(__name__)

TABLE_KEYS = (
    "cell_mask_ap50",
    "nucleus_mask_ap50",
    "cell_mask_ap",
    "nucleus_mask_ap",
    "cell_count_error",
    "nucleus_count_error",
    "confluence_mae",
)


@dataclass(frozen=True)
class SegmentJobConfig(DetectJobConfig):
    """Options of ``msc-ray train-segmenter`` (the detector's, with the segmenter's defaults)."""

    kind: ClassVar[str] = "segmenter"
    backbones: ClassVar[tuple[str, ...]] = models.SEGMENTER_BACKBONES

    # the benchmark's schedule (scripts/quality.py --stages segmenter): at 40 epochs the U-Net was still
    # improving at its last one; with 60, patience ended it at 53 (best 47) — see README
    epochs: int = 60
    min_epochs: int = 0  # 0: half of --epochs
    backbone: str = "unet"
    size: int = 128  # nuclei are a few pixels wide: do not shrink the images below their own size
    batch_size: int = 8  # the U-Net's (Mask R-CNN: 2 with --lr 1e-3, measured)
    lr: float = 3e-3
    min_area: int = 4  # instances (visible parts of cells and nuclei) below this many pixels are not targets
    # the segmenter keeps the small angle in every sample: with half, its short training test's cell
    # counting error rose from 0.47 to 0.78 (the quickstart's mask confluence MAE fell, 11.5 → 5.0 points);
    # one run each way is too little to change it on
    tilt_share: float = 1.0
    # test-time views the U-Net's maps are averaged over for the outer folds, the thresholds chosen on
    # the inner ones and the artifact (models.UNetWatershed.maps); early stopping looks at one view
    views: int = 8

    def validate(self) -> None:
        super().validate()
        check_views(self.views, f"--views {self.views}")

    def build_model(self, anchors: dict, **kwargs) -> torch.nn.Module:
        return models.build_segmenter(self.backbone, image_size=self.size, anchors=anchors, **kwargs)

    def validation_score(self, model, val: engine.Cache, aug: engine.Augmenter, device) -> float:
        """Mean of the cell and nucleus box AP@0.5 on the inner validation part: an early-stopping signal
        that costs one forward pass (COCO mask AP over hundreds of instances per image takes far longer;
        it is computed once per fold, on the outer fold)."""
        preds = engine.predict_instances(
            model, val, aug, batch_size=self.batch_size * 2, device=device, with_masks=False
        )
        vals = [v for v in (engine.instance_box_ap(preds, 1), engine.instance_box_ap(preds, 2)) if not math.isnan(v)]
        return float(np.mean(vals)) if vals else float("nan")


def instance_anchors(cache: engine.Cache, levels: int, min_area: int) -> dict:
    """Anchor sizes and ratios from the training part's cell and nucleus boxes (:func:`engine.anchor_plan`)."""
    boxes = [
        engine.instance_targets(torch.from_numpy(m.astype(np.int64)), min_area)["boxes"].numpy() for m in cache.masks
    ]
    return engine.anchor_plan(boxes, levels)


@dataclass
class SegFoldResult:
    fold: int
    checkpoint: str
    epochs: int
    best_epoch: int
    best_val: float
    val_preds: list  # inner validation: the counting thresholds are chosen here
    preds: list  # outer fold
    ap: dict  # outer-fold mask AP per class
    vote_peak: float = 0.0  # the U-Net's vote-centre threshold, chosen on the inner validation part


def pick_vote_peak(trials: list[tuple[float, float, float]]) -> float:
    """``(vote_peak, counting error, box AP)`` per candidate, the first one off (0) → the threshold
    with the lowest counting error among those whose box AP is not below the one without vote
    centres: counts that improve while the instances do not get worse. On a weakly trained U-Net the
    centres split cells wrongly (the quickstart's: inner box AP@0.5 of cells 0.098 → 0.063 at 3
    votes, its potency from the masks fell); on a well trained one they split merged nuclei."""
    ok = [t for t in trials if t[2] >= trials[0][2]]  # the first (off) always qualifies
    return min(ok, key=lambda t: t[1])[0]


def choose_vote_peak(model, val: engine.Cache, aug: engine.Augmenter, *, batch_size: int, device) -> tuple[float, list]:
    """The U-Net's vote-centre threshold (:data:`msc_ray.models.VOTE_PEAKS`, :func:`pick_vote_peak`) from
    the inner validation part ``val``: counting error of cells plus nuclei (each at its own best score
    threshold) and mean box AP@0.5 of cells and nuclei (the early-stopping measure). Sets it on
    ``model``; returns it and the validation predictions made with it. Other segmenters: 0."""
    if not getattr(model, "offsets", False):
        return 0.0, engine.predict_instances(model, val, aug, batch_size=batch_size, device=device, with_masks=False)
    trials, preds_of, maps = [], {}, {}  # the maps do not depend on the threshold: computed once
    for peak in models.VOTE_PEAKS:
        model.vote_peak = peak
        preds = preds_of[peak] = engine.predict_instances(
            model, val, aug, batch_size=batch_size, device=device, with_masks=False, memo=maps
        )
        th = engine.choose_count_thresholds(preds)
        err = sum(engine.count_error(preds, label, th[name]) for label, name in ((1, "cell"), (2, "nucleus")))
        box = np.nanmean([engine.instance_box_ap(preds, label) for label in (1, 2)])
        trials.append((peak, err if np.isfinite(err) else np.inf, box if np.isfinite(box) else -1.0))
        log.info("vote centres at %.1f votes: inner counting error %.3f, box AP@0.5 %.3f", *trials[-1])
    model.vote_peak = pick_vote_peak(trials)
    return model.vote_peak, preds_of[model.vote_peak]


def _load_views(ckpt_dir: str, job: SegmentJobConfig, vote_peak: float | None = None):
    """The fold's best model as it predicts: with the job's test-time views (U-Nets) and, when given,
    its vote-centre threshold."""
    model, state = load_best(ckpt_dir, job)
    if hasattr(model, "views"):
        model.views = job.views
    if vote_peak is not None and hasattr(model, "vote_peak"):
        model.vote_peak = vote_peak
    return model, state


def predict_fold(job: SegmentJobConfig, fold: int, folds: int, ckpt_dir: str, cache: engine.Cache) -> SegFoldResult:
    """The fold's best model on its inner validation part (which chooses the vote-centre threshold)
    and, with mask AP, on its outer fold."""
    _, val, test = cache.split(fold, folds)
    model, state = _load_views(ckpt_dir, job)
    dev = _device(job)
    aug = engine.Augmenter(job.data_config(), train=False)
    bs = job.batch_size * 2
    # the inner part chooses the vote-centre and counting thresholds: counts need no masks
    peak, vp = choose_vote_peak(model, val, aug, batch_size=bs, device=dev)
    metric = engine.mask_ap_metric()
    tp = engine.predict_instances(model, test, aug, batch_size=bs, device=dev, metric=metric)
    return SegFoldResult(
        fold=fold,
        checkpoint=ckpt_dir,
        epochs=int(state["epoch"]),
        best_epoch=int(state["best_epoch"]),
        best_val=float(state["best_map"]),
        val_preds=vp,
        preds=tp,
        ap=engine.mask_ap_summary(metric),
        vote_peak=peak,
    )


# which of the U-Net's maps limit its masks: each group replaced by the truth's (UNetWatershed.target_maps)
MAP_GROUPS = {
    "the U-Net's maps": (),
    "exact cell foreground and contacts": (0, 1),
    "exact nucleus foreground and contacts": (2, 3),
    "exact offsets": (4, 5),
    "exact maps (the instance drawing's ceiling)": (0, 1, 2, 3, 4, 5),
}


@torch.no_grad()
def map_limits(
    model, cache: engine.Cache, aug: engine.Augmenter, *, batch_size: int, device
) -> tuple[dict[str, dict], dict[str, list[dict]]]:
    """Mask AP of a six-map U-Net (:class:`msc_ray.models.UNetWatershed`) on ``cache`` with its maps as
    they are and with each group of them (:data:`MAP_GROUPS`) replaced by the truth's, the rest and the
    instance drawing unchanged: where the masks are lost, in the network's maps or in the drawing.
    Returns per group, :func:`engine.mask_ap_summary`'s four figures; and per class (``cell``,
    ``nucleus``) the U-Net's own recall by the true instance's visible area (:func:`engine.recall_by_area`:
    ``{"min_area", "max_area" (None: open), "true", "found"}`` per bin), which instances it cannot reach."""
    if not getattr(model, "offsets", False):
        raise ValueError("map limits need a six-map U-Net segmenter (--backbone unet or unet_wide)")
    model.eval()
    metrics_of = {name: engine.mask_ap_metric() for name in MAP_GROUPS}
    counts = np.zeros((2, 2, len(engine.AREA_EDGES)), np.int64)
    for imgs, targets, _ in engine.detection_batches(cache, aug, batch_size):
        maps = model.maps(torch.stack(imgs).to(device)).cpu().numpy()
        for p, t in zip(maps, targets, strict=True):
            truth = models.UNetWatershed.target_maps(t).numpy()
            for name, group in MAP_GROUPS.items():
                q = p.copy()
                q[list(group)] = truth[list(group)]
                r = model.instances(q)
                engine._instance_record(r, t, float("nan"), metrics_of[name], with_masks=True)
                if not group:
                    counts += engine.recall_by_area(r, t)
    edges = list(engine.AREA_EDGES) + [None]
    recall = {
        name: [
            {"min_area": lo, "max_area": hi, "true": int(counts[c, 0, i]), "found": int(counts[c, 1, i])}
            for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:], strict=True))
        ]
        for c, name in enumerate(("cell", "nucleus"))
    }
    return {name: engine.mask_ap_summary(m) for name, m in metrics_of.items()}, recall


def _table(results: list[SegFoldResult], thresholds: dict) -> tuple[list[dict], dict]:
    rows = []
    for r in results:
        rows.append(
            {
                "fold": r.fold,
                "epochs": r.epochs,
                "best_epoch": r.best_epoch,
                "vote_peak": r.vote_peak,
                "images": len(r.preds),
                "cells": int(sum(p["true_cells"] for p in r.preds)),
                "nuclei": int(sum(p["true_nuclei"] for p in r.preds)),
                **r.ap,
                "cell_count_error": engine.count_error(r.preds, 1, thresholds["cell"]),
                "nucleus_count_error": engine.count_error(r.preds, 2, thresholds["nucleus"]),
                "confluence_mae": engine.coverage_mae(r.preds, thresholds["cell"]),
            }
        )
    return rows, {k: metrics.mean_sd([r[k] for r in rows]) for k in TABLE_KEYS}


def _write_table(rows: list[dict], summary: dict, thresholds: dict, job: SegmentJobConfig, out: Path) -> None:
    metrics.write_csv(rows, out / "metrics.csv")
    md = metrics.fold_table_md(
        [{**r, "epochs_best": f"{r['epochs']} ({r['best_epoch']})"} for r in rows],
        ["fold", "epochs_best", "images", "cells", "nuclei"],
        TABLE_KEYS,
        summary,
        "| fold | epochs (best) | images | cells | nuclei | cell AP@0.5 | nucleus AP@0.5 | cell AP@[.5:.95] "
        "| nucleus AP@[.5:.95] | cell count error | nucleus count error | confluence MAE (points) |",
    )
    md += [
        "",
        f"Outer folds: no image of a fold's row was trained on or used to choose anything. Mask AP: COCO "
        f"evaluation (torchmetrics, pycocotools), up to 500 detections per image. Targets and truth: visible "
        f"cell and nucleus parts of at least {job.min_area} px at {job.size} px. Counting error: mean "
        f"|predicted − true| / true per image, at score thresholds chosen on the inner validation folds "
        f"(cell {thresholds['cell']:.2f}, nucleus {thresholds['nucleus']:.2f}); confluence: the share of the "
        "image under predicted cell masks at the cell threshold, against the true confluence. U-Net vote-centre "
        "threshold per fold (chosen on its inner validation part; 0: off): "
        + ", ".join(f"fold {r['fold']} {r['vote_peak']:g}" for r in rows)
        + "."
        + (
            f" The U-Net's maps are the mean of {job.views} test-time views (outer folds and inner thresholds)."
            if job.backbone in models.UNET_WIDTHS
            else ""
        )
        + (
            f" Trained on random {job.crop}-px windows of the {job.size}-px images (early stopping on the centred"
            f" {job.crop}-px window of each inner image); the outer folds and inner thresholds read whole images."
            if job.crop
            else ""
        ),
    ]
    (out / "metrics.md").write_text("\n".join(md) + "\n")


def _panel(
    job: SegmentJobConfig,
    results: list[SegFoldResult],
    cache: engine.Cache,
    folds: int,
    th: dict,
    dest: Path,
    n: int = 4,
) -> str:
    """Outer-fold images: truth outlines (left) and the predicted cells and nuclei (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage.segmentation import find_boundaries

    r = results[0]
    _, _, test = cache.split(r.fold, folds)
    model, _ = _load_views(r.checkpoint, job, r.vote_peak)
    dev = _device(job)
    aug = engine.Augmenter(job.data_config(), train=False)
    picks = np.linspace(0, len(test) - 1, min(n, len(test))).round().astype(int)
    fig, axes = plt.subplots(len(picks), 2, figsize=(6.4, 3.2 * len(picks)), squeeze=False)
    with torch.no_grad():
        for row, j in enumerate(picks):
            x = aug.one(test.images[j], test.keys[j], 0)
            p = model([x.to(dev)])[0]
            gray = test.images[j][0]
            truth = test.masks[j]
            over = np.dstack([gray] * 3).astype(np.float32) / 255
            over[find_boundaries(truth[0].astype(np.int64))] = (0.1, 1.0, 0.1)
            over[find_boundaries(truth[1].astype(np.int64))] = (0.2, 0.4, 1.0)
            axes[row, 0].imshow(over)
            axes[row, 0].set_title(f"truth: {len(np.unique(truth[0])) - 1} cells", fontsize=8)
            pred = np.dstack([gray] * 3).astype(np.float32) / 255
            keep_c = (p["labels"] == 1) & (p["scores"] >= th["cell"])
            keep_n = (p["labels"] == 2) & (p["scores"] >= th["nucleus"])
            for keep, colour in ((keep_c, (1.0, 0.2, 0.2)), (keep_n, (1.0, 1.0, 0.2))):
                for m in (p["masks"][keep][:, 0] >= 0.5).cpu().numpy():
                    pred[find_boundaries(m)] = colour
            axes[row, 1].imshow(pred)
            axes[row, 1].set_title(f"predicted: {int(keep_c.sum())} cells", fontsize=8)
            for a in axes[row]:
                a.axis("off")
    fig.suptitle(
        f"fold {r.fold}: cells (green truth, red predicted), nuclei (blue truth, yellow predicted)", fontsize=8
    )
    fig.tight_layout()
    fig.savefig(dest, dpi=100)
    plt.close(fig)
    return str(dest)


def _export(job: SegmentJobConfig, results: list[SegFoldResult], thresholds: dict, summary: dict) -> dict:
    """The artifact: the fold model with the best inner-validation score, the counting thresholds
    chosen on the inner validation folds, and the anchors it was trained with."""
    best = max(results, key=lambda r: r.best_val)
    saved = _read_state(job, best.checkpoint)
    return models.save_artifact(
        storage.join(job.out, "artifact"),
        saved["best_model"] or saved["model"],
        {
            "kind": "segmenter",
            "architecture": job.backbone,
            "classes": list(models.SEGMENTER_CLASSES),
            "image_size": job.size,
            "score_thresholds": thresholds,
            "anchors": json.loads(saved["anchors"]),
            "stack": job.stack,
            "min_area": job.min_area,
            "vote_peak": best.vote_peak,
            "contact_score": job.backbone in models.UNET_WIDTHS,
            "views": job.views if job.backbone in models.UNET_WIDTHS else 1,
            "trained_on": f"folds other than {best.fold} and its inner validation fold (best inner box AP@0.5)",
            "metrics": {k: {"mean": summary[k][0], "sd": summary[k][1]} for k in TABLE_KEYS},
            "run": {"out": job.out, "manifest": job.manifest, "epochs": best.best_epoch},
        },
        endpoint_url=job.endpoint_url,
    )


def train_segmenter(job: SegmentJobConfig) -> dict:
    """Decode once (images and masks), train every outer fold on Ray Train, choose the counting
    thresholds on the inner validation folds, write the table (outer folds), a panel and the artifact."""
    import ray

    job, manifest, n_folds, folds, out, remote = prepare_run(job)
    cache = data.build_cache(data.select(manifest, stack=job.stack), job.data_config(), masks=True)
    for e in cache.errors:
        log.warning("left out: %s", e)
    if len(cache) == 0:
        raise ValueError(f"{job.manifest}: no {job.stack} image with readable cell and nucleus masks")
    cache_ref = ray.put(cache)
    results, bf16 = [], {}  # per fold: whether its training steps ran under bfloat16 autocast
    for fold in folds:
        train_part = cache.split(fold, n_folds)[0]
        levels = models.SEGMENTER_LEVELS.get(job.backbone)
        anchors = instance_anchors(train_part, levels, job.min_area) if levels else None
        ckpt, last = _train_fold(job, fold, n_folds, cache_ref, anchors)
        bf16[fold] = log_fold(fold, last, "inner mask AP@0.5")
        results.append(predict_fold(job, fold, n_folds, ckpt, cache))
    thresholds = engine.choose_count_thresholds([p for r in results for p in r.val_preds])
    rows, summary = _table(results, thresholds)
    _write_table(rows, summary, thresholds, job, out)
    panel = _panel(job, results, cache, n_folds, thresholds, out / "segmentation.png")
    art = _export(job, results, thresholds, summary)
    result = {
        "table_csv": storage.join(job.out, "metrics.csv"),
        "table_md": storage.join(job.out, "metrics.md"),
        "panel": storage.join(job.out, Path(panel).name),
        "artifact": storage.join(job.out, "artifact"),
        "thresholds": thresholds,
        "folds": rows,
        "summary": {k: {"mean": summary[k][0], "sd": summary[k][1]} for k in TABLE_KEYS},
        "artifact_version": art["version"],
        "bf16": bf16,
        "config": asdict(job),
        "left_out": list(cache.errors),
    }
    (out / "summary.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    if remote:
        storage.upload_dir(out, job.out, job.endpoint_url)
        shutil.rmtree(out, ignore_errors=True)
    return result
