"""The whole search: search, final and export phases, Table 1, plots and the summary."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .. import corpus, engine, metrics, storage
from .crossfit import cross_fit
from .experiment import SearchOutcome
from .export import _export_artifact, calibration, checked_export, export_phase
from .final import _outputs, _plot_winner, _write_table, build_table, final_phase, fold_outputs
from .job import TuneJobConfig, absolute, build_caches
from .search import known_winner, pick_winner, search_phase

log = logging.getLogger(__name__)


def run_search(job: TuneJobConfig, *, resume: bool = False) -> SearchOutcome:
    """Search, finalise the winner on every fold, export the artifact; write table, plots and JSON."""
    job = absolute(job)
    manifest, info = _checked_inputs(job)
    folds, classes = int(info["folds"]), info["classes"][job.stack]
    # tables, plots and the summary are written here, then copied to --out when that is s3://
    remote = storage.is_s3(job.out)
    out = Path(tempfile.mkdtemp(prefix="msc-ray-tune-") if remote else job.out)
    out.mkdir(parents=True, exist_ok=True)
    caches = build_caches(job, manifest)  # tune.with_parameters puts them in Ray's object store once
    # one configuration per fold: the winner is known, and its export trains beside the fold trials
    joined = known_winner(job) is not None
    search = search_phase(job, folds, classes, caches, resume=resume, with_export=joined)
    joined_export = next((t for t in search if t.fold < 0), None)
    search = [t for t in search if t.fold >= 0]
    for t in search:
        if t.error:
            log.warning("trial %s fold %d failed: %s", t.backbone, t.fold, t.error)
    if job.cross_fitted:  # one configuration, validated on nothing: the winner is the job's own
        winner = {**known_winner(job), "mean_search_auc": None}
    else:
        winner = pick_winner(search, folds)
        log.info("winner: %s (mean inner-validation ROC-AUC %.3f)", winner["backbone"], winner["mean_search_auc"])
    # the export trains beside the final fold trials (when it did not beside the search's)
    final = final_phase(job, folds, classes, caches, search, winner, resume=resume, with_export=joined_export is None)
    joined_export = joined_export or next((t for t in final if t.fold < 0), None)
    final = [t for t in final if t.fold >= 0]
    parts = fold_outputs(job, final)
    if job.cross_fitted:
        final, parts = cross_fit(final, parts, classes)
        by_fold = {t.fold: t for t in final}
        search = [by_fold.get(t.fold, t) if t.complete else t for t in search]
    # the whole schedule: mid-schedule weights at peak learning rate swing from epoch to epoch (one
    # measured run: held-out accuracy 0.46, 0.83, 0.46, 0.74 over four epochs), the weights at its end
    # are settled (0.87-0.88 over the last eight); with no validation part, a median "best epoch"
    # lands wherever the swing is
    epochs = job.max_epochs
    if joined_export is None:  # a run interrupted after its final phase by a version that exported apart
        export = export_phase(job, folds, classes, caches, winner, epochs, resume=resume)
    else:
        export = checked_export(joined_export)

    table = build_table(search, final, folds, winner, job.inner_fold)
    outs = _outputs(parts)
    calib = calibration(outs, classes, cross_fitted=job.cross_fitted)
    oof = pooled_outer_figures(outs, classes, calib["temperature"])
    outputs = _write_table(table, out, pooled=oof, inner_fold=job.inner_fold)
    outputs["plots"] = _plot_winner(
        outs,
        classes,
        calib["temperature"],
        f"{job.stack}: {winner['backbone']} (winner), outer folds",
        out / "winner.png",
    )
    art_cfg = _export_artifact(job, export, winner, classes, calib, oof, epochs, info)
    summary = {
        "winner": winner,
        "calibration": calib,
        "outer_folds": oof,
        "artifact_version": art_cfg["version"],
        "export_epochs": epochs,
        "epochs_run": {"search": sum(t.epochs_run for t in search), "final": sum(t.epochs_run for t in final)},
        "table": table,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    outputs["summary"] = str(out / "summary.json")
    outputs = _publish_outputs(job, out, outputs, remote)
    return SearchOutcome(search=search, final=final, table=table, winner=winner, outputs=outputs)


def _checked_inputs(job: TuneJobConfig):
    """The manifest and its summary, after the checks a search needs before it starts anything."""
    manifest = corpus.read_manifest(job.manifest, job.endpoint_url)
    info = corpus.manifest_info(manifest)
    job.validate(info["classes"])
    corpus.check_run(manifest, job.manifest, job.out, job.endpoint_url)
    return manifest, info


def _publish_outputs(job: TuneJobConfig, out: Path, outputs: dict, remote: bool) -> dict:
    """Copy the local results to an s3:// ``--out`` (and name them there); add the artifact's place."""
    if remote:
        storage.upload_dir(out, job.out, job.endpoint_url)
        outputs = {k: storage.join(job.out, Path(v).relative_to(out).as_posix()) for k, v in outputs.items()}
        shutil.rmtree(out, ignore_errors=True)
    outputs["artifact"] = storage.join(job.out, "artifact")
    return outputs


def pooled_outer_figures(outs: dict, classes: list[str], temperature: float) -> dict:
    """The winner's outer-fold outputs pooled over the folds, calibrated with the export's temperature:
    micro figures, per-class precision/recall/F1/ROC-AUC and (with a confluence output) its MAE.

    ``held_out_ece`` (and its floor): the same pooled images, each fold's outputs calibrated with that
    fold's own temperature (fitted on its inner validation part only, or cross-fitted on the other folds'
    outer outputs: tune.crossfit), so no image's probability came
    from a temperature that saw it — Table 1's per-fold ECE on all the outer images at once, where the
    15-bin ECE's upward bias (its floor) is about half that of a 1/k share."""
    k = len(classes)
    probs = metrics.calibrated(outs["test_outputs"][:, :k], temperature)
    oof = metrics.classification_metrics(outs["test_labels"], probs)
    oof["images"] = len(probs)
    if "test_temperature" in outs:  # absent from fold runs saved before the fold's temperature was kept
        own = metrics.calibrated(outs["test_outputs"][:, :k], outs["test_temperature"][:, None])
        oof["held_out_ece"] = metrics.expected_calibration_error(outs["test_labels"], own)
        oof["held_out_ece_floor"] = metrics.ece_floor(own)
    oof["per_class"] = metrics.per_class_metrics(outs["test_labels"], probs, classes)
    if outs["test_outputs"].shape[1] > k:
        pct = engine.confluence_from_outputs(outs["test_outputs"], classes, temperature)
        oof["confluence_mae"] = float(np.mean(np.abs(pct - 100 * outs["test_confluence"])))
    return oof
