"""Table 2 (outer folds), the prediction panel and the exported artifact."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from .. import corpus, data, metrics, models, storage
from ..config import DataConfig
from .job import DetectJobConfig
from .predict import FoldResult, _apply_nms, _read_state

TABLE2_KEYS = ("hit_rate", "fdr", "image_hit_rate", "image_fdr", "map50")


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
