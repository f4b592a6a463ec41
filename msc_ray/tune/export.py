"""The export phase: the winner trained on all images over the whole schedule, its temperature from the
pooled inner-validation outputs, and the artifact scoring loads."""

from __future__ import annotations

import io
from dataclasses import asdict, replace

import torch

from .. import metrics, models, storage
from .experiment import TrialResult, _run_experiment, _space
from .job import _data_config


def export_phase(job, folds, classes, caches, winner, epochs: int, *, resume: bool) -> TrialResult:
    """The winner trained on all images for ``epochs`` (the whole schedule), its final weights kept."""
    space = _space(
        job,
        "export",
        folds,
        classes,
        backbone=winner["backbone"],
        fold=-1,
        lr=winner["lr"],
        weight_decay=winner["weight_decay"],
        epochs=epochs,
    )
    (export,) = _run_experiment(job, "export", space, caches, asha=False, resume=resume, ranked=False)
    return checked_export(export)


def checked_export(export: TrialResult) -> TrialResult:
    """The export run's result, once it is known to have left its model (a checkpoint)."""
    if export.checkpoint is None:
        raise RuntimeError(f"the export run left no checkpoint: {export.error}")
    return export


def calibration(outs: dict, classes: list[str], *, cross_fitted: bool = False) -> dict:
    """The exported temperature (fitted on the winner's pooled inner-validation outputs) and ECE on
    the pooled outer-fold outputs, before and after. Those images were inner-validation images of
    other folds' models; Table 1's per-fold ECE (each fold's own temperature on its own outer fold) is
    the strictly held-out figure.

    ``cross_fitted`` (``--inner-fold train``: no inner validation outputs): the exported temperature is
    fitted on the pooled outer-fold outputs — every image read by the one fold model that never trained
    on it, as the exported model reads images it never saw — and the ECE after is that of each fold
    calibrated with its cross-fitted temperature (``test_temperature``), which never saw the fold."""
    k = len(classes)
    test = outs["test_outputs"][:, :k]
    before = metrics.expected_calibration_error(outs["test_labels"], metrics.calibrated(test))
    if cross_fitted:
        own = metrics.calibrated(test, outs["test_temperature"][:, None])
        return {
            "temperature": metrics.fit_temperature(test, outs["test_labels"]),
            "fitted_on": "pooled outer folds (each image read by the fold model that never trained on it)",
            "ece_before": before,
            "ece_after": metrics.expected_calibration_error(outs["test_labels"], own),
            "ece_floor": metrics.ece_floor(own),
            "measured_on": "pooled outer folds, each calibrated with the other folds' temperature (cross-fitted)",
        }
    temperature = metrics.fit_temperature(outs["val_outputs"][:, :k], outs["val_labels"])
    after = metrics.calibrated(test, temperature)
    return {
        "temperature": temperature,
        "fitted_on": "inner validation folds",
        "ece_before": before,
        "ece_after": metrics.expected_calibration_error(outs["test_labels"], after),
        "ece_floor": metrics.ece_floor(after),
        "measured_on": "pooled outer folds (also inner folds of other folds' models)",
    }


def _export_artifact(job, export: TrialResult, winner, classes, calib, oof_metrics, epochs, info) -> dict:
    raw = storage.read_checkpoint_file(job.out, export.checkpoint, "state.pt", job.endpoint_url)
    if raw is None:
        raise RuntimeError(f"the export run's checkpoint {export.checkpoint} has no state.pt")
    saved = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    weights_file = models.resolve_pretrained(winner["backbone"], job.pretrained)
    dcfg = _data_config(job, winner["backbone"], models.imagenet_sized(weights_file))
    regress = bool(saved.get("confluence_output", False))
    # the compact CNN's coverage map only trained the features: its exported model is the classifier without
    # it; the coverage U-Net's map is its output (no head of its own) and stays
    state = saved["best_model"]
    if models.backbone(winner["backbone"]).head:
        state = {k: v for k, v in state.items() if not k.startswith("coverage.")}
    return models.save_artifact(
        storage.join(job.out, "artifact"),
        state,
        {
            "kind": "classifier",
            "architecture": winner["backbone"],
            "classes": classes,
            "stack": job.stack,
            "data": asdict(replace(dcfg, endpoint_url=None)),
            "dropout": job.dropout,
            "normalisation": {"mean": list(dcfg.norm_mean), "std": list(dcfg.norm_std)},
            "temperature": calib["temperature"],
            "confluence_output": bool(regress),
            "coverage_supervision": bool(saved.get("coverage_supervision", False)),
            "views": job.views,
            "calibration": calib,
            "trained_on": "all images",
            "epochs": epochs,
            "pretrained": str(weights_file) if weights_file else "none",
            "hyperparameters": {"lr": winner["lr"], "weight_decay": winner["weight_decay"]},
            "metrics_outer_folds": oof_metrics,
            "run": {"out": job.out, "manifest": job.manifest, "corpus": info.get("corpus")},
        },
        endpoint_url=job.endpoint_url,
    )
