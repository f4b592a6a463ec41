"""One trial: a thin Tune function trainable around the pure :func:`engine.train_one_epoch` and
:func:`engine.evaluate`, resumable from its checkpoint; Ray-free in :class:`ClassifierRun`."""

from __future__ import annotations

import functools
import os
import tempfile
import time

import numpy as np
import torch

from .. import engine, inference, metrics, models
from ..config import from_dict
from .job import METRIC, TuneJobConfig, _data_config


class ClassifierRun:
    """Everything one trial trains and evaluates, built from its config dict (see
    :func:`classifier_trial`); resumable from its checkpoint. Ray-free: tests drive it directly."""

    def __init__(self, config: dict, caches: dict):
        job = self.job = from_dict(TuneJobConfig, config["job"])
        self.name = config["backbone"]
        self.fold, folds = int(config["fold"]), int(config["folds"])
        # fold -1 trains on every image: the export run, also where it joins the search's experiment
        self.phase = "export" if self.fold < 0 else config["phase"]
        self.classes = list(config["classes"])
        k = len(self.classes)
        weights_file = models.resolve_pretrained(self.name, job.pretrained)
        dcfg = _data_config(job, self.name, models.imagenet_sized(weights_file))
        self.train, self.val, self.test = caches[dcfg.size].split(self.fold, folds, inner_trains=job.cross_fitted)
        self.device = inference.default_device()
        # job.precision resolved once for this device: training and prediction alike
        self.precision = "bf16" if engine.use_bf16(self.device, job.precision) else "fp32"
        torch.manual_seed(job.seed + 1000 * max(self.fold, 0))
        self.regress = bool(job.confluence_head and engine.has_confluence(self.train))
        self.coverage = bool(job.coverage and models.supports_coverage(self.name) and engine.has_coverage(self.train))
        self.model = models.build_classifier(
            self.name,
            k,
            in_channels=job.channels,
            image_size=dcfg.size,
            dropout=job.dropout,
            weights_file=weights_file,
            weights_endpoint_url=job.endpoint_url,
            extra_outputs=int(self.regress),
            coverage_head=self.coverage,
        ).to(self.device)
        self.opt = torch.optim.Adam(
            self.model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"], amsgrad=True
        )
        steps = max(len(self.train) // job.batch_size, 1)
        self.epochs = int(config.get("epochs") or job.max_epochs)
        # the schedule spans the epochs this run will train: an export run (no validation part to pick
        # an epoch on) ends with its learning rate decayed, on settled weights, rather than stopping
        # half-way down a longer schedule wherever the weights happen to be
        self.sched = engine.warmup_cosine(self.opt, self.epochs * steps, job.warmup_epochs * steps)
        self.loss_fn = engine.ClassifierLoss(
            engine.balanced_weights(self.train.labels, k).to(self.device), k, coverage_weight=job.coverage_weight
        )
        batched = job.augment_on == "device" or (job.augment_on == "auto" and self.device.type == "cuda")
        self.aug_train = engine.Augmenter(dcfg, train=True, batched=batched)
        self.aug_eval = engine.Augmenter(dcfg, train=False, batched=batched)
        self.stopper = engine.EarlyStopping(job.patience)
        # moving average of the weights over job.average_epochs epochs of steps (engine.weight_average), or none
        self.average = engine.weight_average(self.model, job.average_epochs * steps) if job.average_epochs > 0 else None
        self.start = 0

    @property
    def judged(self) -> torch.nn.Module:
        """The weights that validate, are kept as the best epoch and are exported: the average's, where
        there is one, else the model's own."""
        return self.average.module if self.average is not None else self.model

    def restore(self, ckpt) -> None:
        """Continue where an interrupted trial stopped (a Tune checkpoint, or None)."""
        if ckpt is None:
            return
        with ckpt.as_directory() as d:
            saved = torch.load(os.path.join(d, "state.pt"), map_location=self.device, weights_only=True)
        self.model.load_state_dict(saved["model"])
        self.opt.load_state_dict(saved["optimizer"])
        self.sched.load_state_dict(saved["scheduler"])
        self.stopper.load_state_dict(saved["stopper"])
        if self.average is not None and saved.get("average") is not None:
            # a checkpoint without one (a run from before averaging) starts it from the next step's weights
            self.average.load_state_dict(saved["average"])
        self.start = int(saved["epoch"])

    def predict(self, part: engine.Cache, views: int = 1) -> np.ndarray:
        return engine.predict(
            self.judged,
            part,
            self.aug_eval,
            batch_size=self.job.batch_size * 2,
            device=self.device,
            views=views,
            precision=self.precision,
        )

    def run_epoch(self, epoch: int) -> tuple[dict, dict, str]:
        """Train one epoch, score the inner validation part; when the trial is done, score the outer
        fold once with the best epoch's weights. Returns (metrics, outer-fold arrays, done reason)."""
        t0 = time.perf_counter()
        stats = engine.train_one_epoch(
            self.model,
            self.train,
            self.aug_train,
            self.opt,
            self.sched,
            self.loss_fn,
            epoch=epoch,
            batch_size=self.job.batch_size,
            device=self.device,
            precision=self.precision,
            average=self.average,
        )
        report = {
            "epoch": epoch + 1,
            "train_loss": stats["loss"],
            "train_images": stats["images"],
            "phase": self.phase,
            "backbone": self.name,
            "fold": self.fold,
            "confluence_output": self.regress,
            "coverage_supervision": self.coverage,
            "bf16": self.precision == "bf16",
        }
        last = epoch + 1 == self.epochs
        if len(self.val) == 0:  # export, or a cross-fitted fold: no validation part, the last weights are kept
            self.stopper.update(float(epoch), epoch + 1, self.judged)
            done = "epochs" if last else ""
        else:
            m = engine.evaluate(self.predict(self.val), self.val, self.classes)
            report.update({METRIC: m["roc_auc"], "val_acc": m["accuracy"], "val_pr_auc": m["pr_auc"]})
            if epoch + 1 >= (self.job.min_epochs or self.epochs // 2) or last:
                self.stopper.update(m["roc_auc"], epoch + 1, self.judged)
            done = "patience" if self.stopper.stop else "max_epochs" if last else ""
            report["best_val_auc"] = self.stopper.best
        extra = {}
        if done and len(self.test):
            predict = functools.partial(self.predict, views=self.job.views)
            extra = _outer_figures(self.judged, self.stopper.best_state, predict, self.val, self.test, self.classes)
            report.update({key: v for key, v in extra.items() if not isinstance(v, np.ndarray)})
        report.update(best_epoch=self.stopper.best_epoch, done_reason=done, epoch_seconds=time.perf_counter() - t0)
        return report, extra, done

    def save(self, folder: str, epoch: int, extra: dict) -> None:
        torch.save(
            {
                "model": self.model.state_dict(),
                "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(),
                "stopper": self.stopper.state_dict(),
                "best_model": self.stopper.best_state,
                "average": self.average.state_dict() if self.average is not None else None,
                "confluence_output": self.regress,
                "coverage_supervision": self.coverage,
                "epoch": epoch + 1,
            },
            os.path.join(folder, "state.pt"),
        )
        arrays = {key: v for key, v in extra.items() if isinstance(v, np.ndarray)}
        if arrays:
            np.savez(os.path.join(folder, "outputs.npz"), **arrays)


def classifier_trial(config: dict, caches: dict | None = None) -> None:
    """One Tune trial: a thin Ray wrapper around :class:`ClassifierRun` (which calls
    :func:`engine.train_one_epoch` and :func:`engine.evaluate`).

    ``config``: ``job`` (TuneJobConfig as a dict), ``phase`` (search | final | export), ``backbone``,
    ``fold`` (the outer fold; -1 trains on all images), ``folds``, ``classes``, ``lr``,
    ``weight_decay``, and for export ``epochs``. ``caches``: input size → :class:`engine.Cache`.

    For outer fold k the images of fold k are never trained on nor used to choose anything: the
    next fold is the inner validation part (early stopping, ASHA, temperature), the rest train.
    When the trial ends, its best epoch's model scores the outer fold once; those are the figures
    of Table 1. Reports per-epoch metrics; a checkpoint holding the current and best state goes with
    the last report and with any report ``job.checkpoint_every_s`` after the previous checkpoint."""
    from ray import tune

    run = ClassifierRun(config, caches)
    run.restore(tune.get_checkpoint())
    saved = time.monotonic()
    for epoch in range(run.start, run.epochs):
        report, extra, done = run.run_epoch(epoch)
        if not done and time.monotonic() - saved < run.job.checkpoint_every_s:
            tune.report(report)
            continue
        with tempfile.TemporaryDirectory() as d:
            run.save(d, epoch, extra)
            tune.report(report, checkpoint=tune.Checkpoint.from_directory(d))
        saved = time.monotonic()
        if done:
            break


def _outer_figures(model, best_model, predict, val, test, classes) -> dict:
    """The best epoch's model on the inner validation part (temperature) and once on the outer
    fold: Table 1's figures, with ECE after calibration on data the temperature never saw. With no
    validation part (a cross-fitted fold: the inner fold trained) the outer outputs alone; the fold's
    temperature and figures follow once every fold has its outputs (:func:`tune.crossfit.cross_fit`)."""
    model.load_state_dict(best_model)
    out_test = predict(test)
    arrays = {
        "test_outputs": out_test,
        "test_labels": test.labels,
        "test_rows": test.rows,
        "test_confluence": test.confluence,
    }
    if len(val) == 0:
        return arrays
    out_val = predict(val)
    temperature = metrics.fit_temperature(out_val[:, : len(classes)], val.labels)
    return {
        **outer_fold_figures(out_test, test, classes, temperature),
        "val_outputs": out_val,
        "val_labels": val.labels,
        **arrays,
    }


def outer_fold_figures(out_test: np.ndarray, test, classes: list[str], temperature: float) -> dict:
    """Table 1's figures of one outer fold, its outputs calibrated with ``temperature`` (fitted on data
    that holds none of its images); ``test`` has the fold's ``labels`` and ``confluence``."""
    k = len(classes)
    m = engine.evaluate(out_test, test, classes, temperature)
    return {
        "test_auc": m["roc_auc"],
        "test_acc": m["accuracy"],
        "test_pr_auc": m["pr_auc"],
        "test_ece_before": engine.evaluate(out_test, test, classes)["ece"],
        "test_ece_after": m["ece"],
        # what a calibrated model would show on this many images (only here: not on every epoch's validation)
        "test_ece_floor": metrics.ece_floor(metrics.calibrated(out_test[:, :k], temperature)),
        "temperature": temperature,
        "test_confluence_mae": m.get("confluence_mae", float("nan")),
        # the fold's own temperature beside each outer-fold row, so the folds' calibrated outputs can be
        # pooled (tune.run.pooled_outer_figures): a held-out ECE over every outer image, not 1/k of them
        "test_temperature": np.full(len(out_test), temperature, dtype=np.float64),
    }
