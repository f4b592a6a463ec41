"""``msc-ray train-detector``: every outer fold, the operating point, Table 2 and the artifact."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

from .. import corpus, data, engine, models, storage
from .job import DetectJobConfig, detection_rows
from .predict import choose_operating_point, predict_fold
from .results import TABLE2_KEYS, _export, _panel, _table, _write_table2
from .worker import _train_fold, log_fold

log = logging.getLogger(__name__)


def prepare_run(job: DetectJobConfig) -> tuple:
    """What a per-fold Ray Train run (detector or segmenter) checks and sets up before any work.
    Returns ``(job with absolute paths, manifest, number of folds (≥ 3: nested evaluation), folds to
    run, local output folder, whether --out is s3://)``; the tables, panel and summary are written to
    the local folder, then copied to --out when that is s3://. ``--out`` is checked writable and seen
    by every node."""
    job.validate()
    job = replace(job, manifest=storage.absolute(job.manifest), out=storage.absolute(job.out))
    manifest = corpus.read_manifest(job.manifest, job.endpoint_url)
    n_folds = corpus.check_run(manifest, job.manifest, job.out, job.endpoint_url)
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
