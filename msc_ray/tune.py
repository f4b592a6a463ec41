"""Backbone × fold search for the confluence classifier on Ray Tune.

Three Tune experiments under ``RUN/``, each resumable with ``Tuner.restore``:

Nested evaluation: for outer fold k, fold k is the test part (Table 1's figures; nothing is
trained, stopped, selected or calibrated on it), fold k+1 is the inner validation part (early
stopping, ASHA, backbone choice, temperature), the other folds train.

1. ``search``: one trial per (backbone, outer fold, sampled learning rate and weight decay). AMSGrad
   Adam (its ``weight_decay`` is L2 regularisation), warm-up then cosine learning rate, class-weighted
   cross-entropy plus a confluence regression output where the corpus carries measured confluence,
   patience on inner-validation micro ROC-AUC, and ASHA across the trials *of the same fold*.
2. ``final``: the winning configuration on every fold without ASHA (reusing search trials that ran it
   to the end), so the winner's row is complete; its outer-fold outputs give the ROC/PR curves and the
   confusion matrix, its inner-validation outputs the temperature.
3. ``export``: the winner trained on all images over the whole schedule (``max_epochs``, final
   weights: nothing is left to pick an epoch on): the artifact scoring loads (one forward pass per
   image, where a five-model fold ensemble would cost five).

Images are decoded and resized once, before any trial (Ray Data tasks → :class:`engine.Cache`), and
reach trials through Ray's object store; a trial (:func:`classifier_trial`, one config dict) is a
thin wrapper around :func:`engine.train_one_epoch` and :func:`engine.evaluate` and needs no data
tasks while it trains, so trials only ask for their own CPUs (and GPU share) and queue for them.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from . import check_views, corpus, data, engine, inference, metrics, models, storage
from .config import DataConfig, from_dict

log = logging.getLogger(__name__)

METRIC = "val_auc"
AUGMENT_ON = ("auto", "cpu", "device")
# (input side, epochs) per stack where a job leaves them at 0. Single-stack: 64 px holds confluence (96 px
# gained nothing, at twice the cost). Multi-stack: its cells are one-pixel edges that 64 px loses — the
# compact CNN, 30 epochs, read 400 new-vessel images at 0.82 / 0.76 from 64 px against 0.91 / 0.89 from
# 128 px (800 / 480 training images, development corpora) — and learn late: 60 epochs read new vessels
# at 0.895 against 0.880 for 30 (scripts/quality.py). See README, "Why these defaults".
STACK_DEFAULTS = {"sstack": (64, 25), "mstack": (128, 60)}


@dataclass(frozen=True)
class TuneJobConfig:
    manifest: str  # manifest URI (the CLI indexes a corpus into RUN/manifest.parquet first)
    out: str  # run folder: a local path (a shared mount on a cluster) or s3://bucket/prefix
    stack: str = "sstack"
    backbones: tuple[str, ...] = ("compact_cnn", "resnet18")
    max_epochs: int = 0  # 0: by stack (STACK_DEFAULTS), set when the config is made
    patience: int = 6
    # no best epoch is kept and no trial stops before this epoch (0: half of max_epochs): mid-schedule, at
    # the peak learning rate, inner-validation accuracy swings from epoch to epoch (one fold: 0.71 0.88 0.86
    # 0.47 0.71), so a best epoch picked there is a lucky draw and patience ends the trial on a dip long
    # before the cosine decay settles the weights (see README, "Why these defaults")
    min_epochs: int = 0
    warmup_epochs: int = 2
    confluence_head: bool = True  # a regression output where the corpus carries measured confluence
    # coverage supervision: where the corpus has cell masks (masks/<stack>/, as the synthetic corpus and
    # segmentation exports have), backbones that support it (the compact CNN) also learn a coverage map
    # of their last features against the covered pixels; training only — the exported model leaves it out
    coverage: bool = True
    coverage_weight: float = 3.0  # the coverage term's weight beside the band and confluence losses
    # test-time views (engine.view_mean): the temperature, Table 1 and the exported model average the
    # outputs over the image's quarter turns and mirror images (8), its quarter turns (4) or take it as
    # it is (1); the per-epoch validation (early stopping, ASHA) takes one view
    views: int = 8
    samples: int = 2  # hyper-parameter samples per (backbone, fold)
    lr_min: float = 1e-3
    lr_max: float = 3e-3
    wd_min: float = 1e-6
    wd_max: float = 1e-3
    batch_size: int = 32
    # input side; 0: by stack (STACK_DEFAULTS): confluence is a low-frequency property and single-stack
    # images hold it at 64 px, multi-stack cells are thin, faint edges that vanish there (see README)
    size: int = 0
    channels: int = 3
    dropout: float = 0.5
    pretrained: str = "auto"  # auto | none | path to a state dict
    asha: bool = True
    grace_period: int = 4
    reduction_factor: int = 2
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent: int = 0  # 0: no limit; trials queue for their resources
    seed: int = 0
    endpoint_url: str | None = None
    verbose: int = 1  # Tune's console output: 0 silent, 1 status tables
    # a trial checkpoints when it ends and otherwise at most this often (seconds of its own time; 0: after
    # every epoch). Every checkpoint forces a snapshot of the experiment's state: with 3-second CPU epochs
    # checkpointed each epoch, Tune snapshotted several times in 5 s and warned so 250 times in one
    # quality.py run, and every epoch's weights went to the run folder (S3 included). A resumed trial
    # repeats at most this much of its work.
    checkpoint_every_s: float = 30.0
    # where each training batch is augmented: "cpu" (one image at a time, torchvision's transforms),
    # "device" (whole batches on the trial's device, augment.BatchAugment) or "auto" (device on a GPU)
    augment_on: str = "auto"
    # arithmetic of the classifier's forward passes: "bf16" (bfloat16 autocast), "fp32", or "auto" —
    # bf16 on a GPU and on a CPU that does it in hardware (engine.use_bf16: half the time per step)
    precision: str = "auto"

    def __post_init__(self) -> None:
        # the stack's measured defaults where the caller left size or epochs at 0 (the CLI's defaults), so
        # every saved config, trial and artifact holds the values that were used
        size, epochs = STACK_DEFAULTS.get(self.stack, STACK_DEFAULTS["sstack"])
        if self.size == 0:
            object.__setattr__(self, "size", size)
        if self.max_epochs == 0:
            object.__setattr__(self, "max_epochs", epochs)

    def validate(self, classes_by_stack: dict[str, list[str]]) -> None:
        for b in self.backbones:
            models.backbone(b)
        if self.stack not in classes_by_stack:
            raise ValueError(f"--stack {self.stack}: the manifest has {', '.join(classes_by_stack) or 'no'} stacks")
        if self.coverage_weight < 0:
            raise ValueError(f"--coverage-weight {self.coverage_weight}: must be at least 0")
        if self.max_epochs < 1 or self.patience < 1 or self.samples < 1:
            raise ValueError("--max-epochs, --patience and --samples must be at least 1")
        if self.augment_on not in AUGMENT_ON:
            raise ValueError(f"--augment-on {self.augment_on}: choose one of {', '.join(AUGMENT_ON)}")
        check_views(self.views, f"--views {self.views}")
        engine.check_precision(self.precision)


def _data_config(job: TuneJobConfig, backbone: str, pretrained: bool) -> DataConfig:
    return DataConfig(
        size=models.input_size(backbone, job.size, pretrained),
        channels=job.channels,
        equalize=job.stack == "mstack",
        seed=job.seed,
        endpoint_url=job.endpoint_url,
    )


def build_caches(job: TuneJobConfig, manifest) -> dict[int, engine.Cache]:
    """Decode every image of the stack once per input size the backbones need (Ray Data tasks),
    before any trial starts; trials get the caches through Ray's object store. A size that a backbone
    with a coverage head trains at also keeps the covered pixels (:func:`_has_cell_masks`)."""
    rows = data.select(manifest, stack=job.stack)
    configs: dict[int, DataConfig] = {}
    coverage_sizes: set[int] = set()
    for name in job.backbones:
        dcfg = _data_config(job, name, models.resolve_pretrained(name, job.pretrained) is not None)
        configs.setdefault(dcfg.size, dcfg)
        if job.coverage and models.supports_coverage(name):
            coverage_sizes.add(dcfg.size)
    if coverage_sizes and not _has_cell_masks(job, rows):
        coverage_sizes = set()
    caches: dict[int, engine.Cache] = {}
    for size, dcfg in configs.items():
        coverage = size in coverage_sizes
        caches[size] = c = data.build_cache(rows, dcfg, coverage=coverage)
        for e in c.errors:
            log.warning("left out: %s", e)
        if coverage:
            known = int(c.covered_ok.sum()) if c.covered_ok is not None else 0
            log.info("coverage supervision at %d px: cell masks for %d of %d images", size, known, len(c))
    return caches


def _has_cell_masks(job: TuneJobConfig, rows) -> bool:
    """Whether the corpus has a cell mask for its first image: a corpus without masks costs one read."""
    first = rows.slice(0, 1).to_pylist()[0]
    return storage.exists(data.mask_uris(first["uri"], first["path"], first["stack"])[0], job.endpoint_url)


class ClassifierRun:
    """Everything one trial trains and evaluates, built from its config dict (see
    :func:`classifier_trial`); resumable from its checkpoint. Ray-free: tests drive it directly."""

    def __init__(self, config: dict, caches: dict):
        job = self.job = from_dict(TuneJobConfig, config["job"])
        self.phase, self.name = config["phase"], config["backbone"]
        self.fold, folds = int(config["fold"]), int(config["folds"])
        self.classes = list(config["classes"])
        k = len(self.classes)
        weights_file = models.resolve_pretrained(self.name, job.pretrained)
        dcfg = _data_config(job, self.name, weights_file is not None)
        self.train, self.val, self.test = caches[dcfg.size].split(self.fold, folds)
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
        self.start = 0

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
        self.start = int(saved["epoch"])

    def predict(self, part: engine.Cache, views: int = 1) -> np.ndarray:
        return engine.predict(
            self.model,
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
        if len(self.val) == 0:  # export: all images train, no early stopping
            self.stopper.update(float(epoch), epoch + 1, self.model)
            done = "epochs" if last else ""
        else:
            m = engine.evaluate(self.predict(self.val), self.val, self.classes)
            report.update({METRIC: m["roc_auc"], "val_acc": m["accuracy"], "val_pr_auc": m["pr_auc"]})
            if epoch + 1 >= (self.job.min_epochs or self.epochs // 2) or last:
                self.stopper.update(m["roc_auc"], epoch + 1, self.model)
            done = "patience" if self.stopper.stop else "max_epochs" if last else ""
            report["best_val_auc"] = self.stopper.best
        extra = {}
        if done and len(self.test):
            predict = functools.partial(self.predict, views=self.job.views)
            extra = _outer_figures(self.model, self.stopper.best_state, predict, self.val, self.test, self.classes)
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
    fold: Table 1's figures, with ECE after calibration on data the temperature never saw."""
    model.load_state_dict(best_model)
    out_val, out_test = predict(val), predict(test)
    k = len(classes)
    temperature = metrics.fit_temperature(out_val[:, :k], val.labels)
    m = engine.evaluate(out_test, test, classes, temperature)
    raw = engine.evaluate(out_test, test, classes)
    figures = {
        "test_auc": m["roc_auc"],
        "test_acc": m["accuracy"],
        "test_pr_auc": m["pr_auc"],
        "test_ece_before": raw["ece"],
        "test_ece_after": m["ece"],
        # what a calibrated model would show on this many images (only here: not on every epoch's validation)
        "test_ece_floor": metrics.ece_floor(metrics.calibrated(out_test[:, :k], temperature)),
        "temperature": temperature,
        "test_confluence_mae": m.get("confluence_mae", float("nan")),
        "val_outputs": out_val,
        "val_labels": val.labels,
        "test_outputs": out_test,
        "test_labels": test.labels,
        "test_rows": test.rows,
        "test_confluence": test.confluence,
    }
    return figures


# --------------------------------------------------------------------------------------------------
# ASHA per fold
# --------------------------------------------------------------------------------------------------


def per_fold_asha(job: TuneJobConfig):
    """A scheduler that keeps one ASHA bracket per fold: trials are only compared within a fold."""
    from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler

    class PerFoldASHA(FIFOScheduler):
        def __init__(self):
            super().__init__()
            self._by_fold: dict[int, AsyncHyperBandScheduler] = {}
            self._metric, self._mode = METRIC, "max"

        def set_search_properties(self, metric, mode, **spec) -> bool:
            self._metric, self._mode = metric or self._metric, mode or self._mode
            return True

        def _asha(self, trial) -> AsyncHyperBandScheduler:
            fold = int(trial.config.get("fold", 0))
            if fold not in self._by_fold:
                self._by_fold[fold] = AsyncHyperBandScheduler(
                    time_attr="training_iteration",
                    metric=self._metric,
                    mode=self._mode,
                    max_t=job.max_epochs,
                    grace_period=min(job.grace_period, job.max_epochs),
                    reduction_factor=job.reduction_factor,
                )
            return self._by_fold[fold]

        def on_trial_add(self, controller, trial):
            self._asha(trial).on_trial_add(controller, trial)

        def on_trial_result(self, controller, trial, result) -> str:
            if METRIC not in result:
                return TrialScheduler.CONTINUE
            return self._asha(trial).on_trial_result(controller, trial, result)

        def on_trial_complete(self, controller, trial, result):
            if result and METRIC in result:
                self._asha(trial).on_trial_complete(controller, trial, result)

        def on_trial_remove(self, controller, trial):
            self._asha(trial).on_trial_remove(controller, trial)

        def debug_string(self) -> str:
            return f"ASHA per fold over {len(self._by_fold)} folds"

    return PerFoldASHA()


# --------------------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------------------


@dataclass
class TrialResult:
    backbone: str
    fold: int
    lr: float
    weight_decay: float
    epochs_run: int
    done_reason: str  # patience | max_epochs | epochs | "" (stopped by ASHA, or errored)
    best_val_auc: float = float("nan")  # inner validation: what selection sees
    best_epoch: int = 0
    test_auc: float = float("nan")  # outer fold: what Table 1 reports
    test_acc: float = float("nan")
    test_pr_auc: float = float("nan")
    test_ece_after: float = float("nan")
    test_ece_floor: float = float("nan")  # the ECE a calibrated model would show on that fold's images
    test_confluence_mae: float = float("nan")
    checkpoint: str | None = None
    error: str | None = None

    @property
    def complete(self) -> bool:
        return bool(self.done_reason)


@dataclass
class SearchOutcome:
    search: list[TrialResult]
    final: list[TrialResult]
    table: list[dict]
    winner: dict
    outputs: dict[str, str] = field(default_factory=dict)


def _resources(job: TuneJobConfig) -> dict:
    res = {"cpu": job.cpus_per_trial}
    if job.gpus_per_trial:
        res["gpu"] = job.gpus_per_trial
    return res


def _run_experiment(
    job: TuneJobConfig, name: str, param_space: dict, caches: dict, *, asha: bool, resume: bool, num_samples: int = 1
):
    """One resumable Tune experiment under ``RUN/name``. Trials ask for their own resources and
    queue for them (``--max-concurrent`` caps how many run at once; nothing reads the cluster's
    current size), and get the decoded images through Ray's object store (``tune.with_parameters``)."""
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    storage_path, fs = storage.ray_storage(job.out, job.endpoint_url)
    path = os.path.join(storage_path, name)
    trainable = tune.with_resources(tune.with_parameters(classifier_trial, caches=caches), _resources(job))
    if tune.Tuner.can_restore(path, storage_filesystem=fs):
        if not resume:
            where = storage.join(job.out, name)
            raise ValueError(f"{where} holds an earlier experiment: pass --resume to finish it, or use a new --out")
        log.info("resuming %s", storage.join(job.out, name))
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True, storage_filesystem=fs)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=METRIC if name != "export" else None,
                mode="max" if name != "export" else None,
                num_samples=num_samples,
                scheduler=per_fold_asha(job) if asha else None,
                # seeded sampling: the same job samples the same learning rates and weight decays
                # (the concurrency limit goes here: Tune ignores max_concurrent_trials for this generator)
                search_alg=BasicVariantGenerator(random_state=job.seed, max_concurrent=job.max_concurrent),
                trial_dirname_creator=lambda t: f"{t.config['backbone']}-fold{t.config['fold']}-{t.trial_id}",
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=storage_path,
                storage_filesystem=fs,
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                failure_config=tune.FailureConfig(max_failures=1),
                verbose=job.verbose,
            ),
        )
    grid = fit_tuner(tuner, quiet=job.verbose == 0)
    if grid.num_terminated + grid.num_errors < len(grid):
        raise ValueError(f"the {name} experiment was interrupted; finish it with --resume (same --out)")
    results = _collect(grid)
    if results and all(r.error for r in results):
        raise ValueError(f"every {name} trial failed; the first: {results[0].error}")
    return results


def _first_line(error) -> str:
    """The trial's own exception as one line, ``Type: message`` (Tune wraps it in its own errors)."""
    cause = getattr(error, "cause", None) or error
    lines = [ln.strip() for ln in str(cause).strip().splitlines() if ln.strip()]
    if len(lines) > 1:  # a formatted traceback: the raised exception is its last "Type: message" line
        for ln in reversed(lines):
            head = ln.split(":")[0]
            if ":" in ln and head.replace(".", "").isidentifier() and not ln.startswith("File "):
                return ln
    msg = lines[-1] if lines else ""
    return f"{type(cause).__name__}: {msg}" if msg else type(cause).__name__


# Each trial keeps one checkpoint (``num_to_keep=1``), so Tune snapshots the experiment after every
# trial checkpoint (resume must not point at a deleted one) and warns that snapshots "may become a
# bottleneck" whenever two come within 5 s — which trials of one fold ending together do (six times in
# the suite's 6-trial search). The snapshot is a few small files; Tune's warning for a snapshot that takes
# over 30 s stays on, and a value the user sets is kept.
SNAPSHOT_WARNING = "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S"


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    """``os.environ`` with ``values`` for the duration of the block, restored after it."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def fit_tuner(tuner, *, quiet: bool):
    """``tuner.fit()`` without the forced-snapshot warning (:data:`SNAPSHOT_WARNING`); ``quiet``: with
    no console output at all. Tune's default console reporter prints the experiment's header and paths
    even at verbosity 0; its legacy reporter prints nothing there, so a silent fit selects it for the
    duration of the call."""
    env = {} if SNAPSHOT_WARNING in os.environ else {SNAPSHOT_WARNING: "0"}
    if quiet:
        env["RAY_AIR_NEW_OUTPUT"] = "0"
    with _environment(env):
        return tuner.fit()


def _collect(grid) -> list[TrialResult]:
    out = []
    nan = float("nan")
    for r in grid:
        cfg, m = r.config, r.metrics or {}
        out.append(
            TrialResult(
                backbone=cfg["backbone"],
                fold=int(cfg["fold"]),
                lr=float(cfg["lr"]),
                weight_decay=float(cfg["weight_decay"]),
                epochs_run=int(m.get("epoch", 0)),
                done_reason=str(m.get("done_reason", "") or ""),
                best_val_auc=float(m.get("best_val_auc", nan)),
                best_epoch=int(m.get("best_epoch", 0)),
                test_auc=float(m.get("test_auc", nan)),
                test_acc=float(m.get("test_acc", nan)),
                test_pr_auc=float(m.get("test_pr_auc", nan)),
                test_ece_after=float(m.get("test_ece_after", nan)),
                test_ece_floor=float(m.get("test_ece_floor", nan)),
                test_confluence_mae=float(m.get("test_confluence_mae", nan)),
                checkpoint=r.checkpoint.path if r.checkpoint else None,
                error=_first_line(r.error) if r.error else None,
            )
        )
    return out


TABLE_KEYS = ("test_auc", "test_acc", "test_pr_auc", "test_ece_after", "test_ece_floor", "test_confluence_mae")


def build_table(search: list[TrialResult], final: list[TrialResult], folds: int, winner: dict) -> list[dict]:
    """Table 1: per backbone, mean ± SD over the outer folds. On each fold the trial picked is the
    complete one with the best *inner* validation ROC-AUC, and its figures are those of the outer
    fold, which nothing chose. A backbone that ASHA cut short on any fold is marked cut and gets no
    mean (averaging only the folds it survived would flatter it). The winner's row comes from its
    complete run on every fold."""
    rows = []
    by_backbone: dict[str, list[TrialResult]] = defaultdict(list)
    for t in search:
        by_backbone[t.backbone].append(t)
    for name, trials in by_backbone.items():
        picked, cut = [], []
        for f in range(folds):
            complete = [t for t in trials if t.fold == f and t.complete and not math.isnan(t.best_val_auc)]
            if complete:
                picked.append(max(complete, key=lambda t: t.best_val_auc))
            else:
                cut.append(f)
        status = "complete" if not cut else f"cut by ASHA on fold(s) {','.join(map(str, cut))}: no mean"
        rows.append(
            _row(
                name,
                "search: best trial per fold by inner validation",
                [] if cut else picked,
                folds,
                status,
                complete=len(picked),
            )
        )
    if final:
        label = f"winner, lr={winner['lr']:.2e} wd={winner['weight_decay']:.2e}, all folds"
        done = [t for t in final if t.complete]
        status = "complete" if len(done) == folds else f"{len(done)}/{folds} folds finished"
        rows.append(_row(winner["backbone"], label, done, folds, status, complete=len(done)))
    return rows


def _row(name: str, what: str, trials: list[TrialResult], folds: int, status: str, complete: int) -> dict:
    row = {"backbone": name, "run": what, "folds_complete": f"{complete}/{folds}"}
    for key in TABLE_KEYS:
        mean, sd = metrics.mean_sd([getattr(t, key) for t in trials])
        row[key.removeprefix("test_") + "_mean"] = mean
        row[key.removeprefix("test_") + "_sd"] = sd
    row["status"] = status
    return row


def pick_winner(search: list[TrialResult], folds: int) -> dict:
    """The backbone with the best mean (over folds) of its per-fold best *inner validation* AUC,
    with the learning rate and weight decay of its best single trial. Outer folds play no part."""
    scores = {}
    for name in {t.backbone for t in search}:
        per_fold = []
        for f in range(folds):
            aucs = [
                t.best_val_auc for t in search if t.backbone == name and t.fold == f and not math.isnan(t.best_val_auc)
            ]
            per_fold.append(max(aucs) if aucs else 0.0)
        scores[name] = float(np.mean(per_fold))
    if not scores or all(math.isnan(t.best_val_auc) for t in search):
        raise ValueError("no trial reported a result" + (f"; the first error: {search[0].error}" if search else ""))
    best = max(scores, key=lambda n: (scores[n], n))
    top = max(
        (t for t in search if t.backbone == best and not math.isnan(t.best_val_auc)),
        key=lambda t: t.best_val_auc,
    )
    return {"backbone": best, "lr": top.lr, "weight_decay": top.weight_decay, "mean_search_auc": scores[best]}


def _write_table(rows: list[dict], out: Path) -> dict[str, str]:
    csv_path, md_path = out / "table.csv", out / "table.md"
    metrics.write_csv(rows, csv_path)
    lines = [
        "| backbone | run | folds | micro ROC-AUC | accuracy | micro PR-AUC | ECE (calibrated) | ECE floor "
        "| confluence MAE (pts) | status |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(r: dict, k: str) -> str:
        return "n/a" if math.isnan(r[k + "_mean"]) else f"{r[k + '_mean']:.3f} ± {r[k + '_sd']:.3f}"

    for r in rows:
        lines.append(
            f"| {r['backbone']} | {r['run']} | {r['folds_complete']} | {cell(r, 'auc')} | {cell(r, 'acc')} | "
            f"{cell(r, 'pr_auc')} | {cell(r, 'ece_after')} | {cell(r, 'ece_floor')} | {cell(r, 'confluence_mae')} | "
            f"{r['status']} |"
        )
    lines += [
        "",
        "Figures are on the outer folds: nothing was trained, stopped or calibrated on them. Early "
        "stopping, ASHA, backbone choice and the temperature used the inner validation fold. ECE floor: the "
        "ECE a perfectly calibrated model would show on the same images (labels drawn from its own "
        "probabilities); ECE is biased upwards on small folds, so read the calibrated ECE against it.",
    ]
    md_path.write_text("\n".join(lines) + "\n")
    return {"table_csv": str(csv_path), "table_md": str(md_path)}


def _outputs(job: TuneJobConfig, final: list[TrialResult]) -> dict[str, np.ndarray]:
    """The winner's inner-validation and outer-fold outputs of every fold, concatenated."""
    parts = []
    for t in final:
        if not t.checkpoint:
            continue
        raw = storage.read_checkpoint_file(job.out, t.checkpoint, "outputs.npz", job.endpoint_url)
        if raw is not None:
            with np.load(io.BytesIO(raw), allow_pickle=False) as z:
                parts.append({k: z[k] for k in z.files})
    if not parts:
        raise RuntimeError("the winner's fold runs left no outputs")
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _plot_winner(outs: dict, classes: list[str], temperature: float, title: str, dest: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay, precision_recall_curve, roc_curve

    k = len(classes)
    labels = outs["test_labels"]
    probs = metrics.calibrated(outs["test_outputs"][:, :k], temperature)
    yy = metrics.one_hot(labels, k)
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.6))
    fpr, tpr, _ = roc_curve(yy.ravel(), probs.ravel())
    m = metrics.classification_metrics(labels, probs)
    ax[0].plot(fpr, tpr, label=f"micro ROC-AUC {m['roc_auc']:.3f}")
    ax[0].plot([0, 1], [0, 1], "k--", lw=0.8)
    ax[0].set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (micro, outer folds)")
    ax[0].legend(loc="lower right")
    prec, rec, _ = precision_recall_curve(yy.ravel(), probs.ravel())
    ax[1].plot(rec, prec, label=f"micro PR-AUC {m['pr_auc']:.3f}")
    ax[1].set(xlabel="recall", ylabel="precision", title="precision-recall (micro, outer folds)")
    ax[1].legend(loc="lower left")
    ConfusionMatrixDisplay(np.array(m["confusion"]), display_labels=classes).plot(ax=ax[2], colorbar=False)
    ax[2].set_title(f"confusion, accuracy {m['accuracy']:.3f}")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(dest, dpi=110)
    plt.close(fig)
    return str(dest)


def _space(job: TuneJobConfig, phase: str, folds: int, classes: list[str], **fixed) -> dict:
    return {"job": asdict(job), "phase": phase, "folds": folds, "classes": classes, **fixed}


def search_phase(
    job: TuneJobConfig, folds: int, classes: list[str], caches: dict, *, resume: bool = False, name: str = "search"
) -> list[TrialResult]:
    """The backbone × outer fold × sampled-hyper-parameter trials (ASHA per fold when ``job.asha``)."""
    from ray import tune

    lr = tune.loguniform(job.lr_min, job.lr_max) if job.lr_max > job.lr_min else job.lr_min
    wd = tune.loguniform(job.wd_min, job.wd_max) if job.wd_max > job.wd_min else job.wd_min
    space = _space(
        job,
        "search",
        folds,
        classes,
        backbone=tune.grid_search(list(job.backbones)),
        fold=tune.grid_search(list(range(folds))),
        lr=lr,
        weight_decay=wd,
    )
    samples = job.samples if (job.lr_max > job.lr_min or job.wd_max > job.wd_min) else 1
    return _run_experiment(job, name, space, caches, asha=job.asha, resume=resume, num_samples=samples)


def final_phase(job, folds, classes, caches, search, winner, *, resume: bool) -> list[TrialResult]:
    """The winner's configuration on every outer fold, without ASHA. Folds on which the search
    already ran exactly that configuration to completion are reused, not trained again."""
    from ray import tune

    same = {
        t.fold: t
        for t in search
        if t.backbone == winner["backbone"]
        and t.complete
        and t.lr == winner["lr"]
        and t.weight_decay == winner["weight_decay"]
    }
    missing = [f for f in range(folds) if f not in same]
    ran = []
    if missing:
        space = _space(
            job,
            "final",
            folds,
            classes,
            backbone=winner["backbone"],
            fold=tune.grid_search(missing),
            lr=winner["lr"],
            weight_decay=winner["weight_decay"],
        )
        ran = _run_experiment(job, "final", space, caches, asha=False, resume=resume)
    return sorted(list(same.values()) + ran, key=lambda t: t.fold)


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
    (export,) = _run_experiment(job, "export", space, caches, asha=False, resume=resume)
    if export.checkpoint is None:
        raise RuntimeError(f"the export run left no checkpoint: {export.error}")
    return export


def calibration(outs: dict, classes: list[str]) -> dict:
    """The exported temperature (fitted on the winner's pooled inner-validation outputs) and ECE on
    the pooled outer-fold outputs, before and after. Those images were inner-validation images of
    other folds' models; Table 1's per-fold ECE (each fold's own temperature on its own outer fold) is
    the strictly held-out figure."""
    k = len(classes)
    temperature = metrics.fit_temperature(outs["val_outputs"][:, :k], outs["val_labels"])
    test = outs["test_outputs"][:, :k]
    after = metrics.calibrated(test, temperature)
    return {
        "temperature": temperature,
        "fitted_on": "inner validation folds",
        "ece_before": metrics.expected_calibration_error(outs["test_labels"], metrics.calibrated(test)),
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
    dcfg = _data_config(job, winner["backbone"], weights_file is not None)
    regress = bool(saved.get("confluence_output", False))
    # the coverage map only trained the features: the exported model is the classifier without it
    state = {k: v for k, v in saved["best_model"].items() if not k.startswith("coverage.")}
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


def absolute(job: TuneJobConfig) -> TuneJobConfig:
    """Local paths made absolute: trials run in their own working folders."""
    return replace(job, manifest=storage.absolute(job.manifest), out=storage.absolute(job.out))


def run_search(job: TuneJobConfig, *, resume: bool = False) -> SearchOutcome:
    """Search, finalise the winner on every fold, export the artifact; write table, plots and JSON."""
    job = absolute(job)
    manifest = corpus.read_manifest(job.manifest, job.endpoint_url)
    info = corpus.manifest_info(manifest)
    job.validate(info["classes"])
    folds = int(info["folds"])
    if folds < 3:
        raise ValueError(f"{job.manifest}: {folds} folds; nested evaluation needs at least 3 (outer, inner, training)")
    classes = info["classes"][job.stack]
    storage.check_writable(job.out, job.endpoint_url)
    first = manifest.column("uri")[0].as_py() if manifest.num_rows else ""
    storage.ensure_shared({"--out": job.out, "the manifest": job.manifest, "the corpus (first image)": first})
    # tables, plots and the summary are written here, then copied to --out when that is s3://
    remote = storage.is_s3(job.out)
    out = Path(tempfile.mkdtemp(prefix="msc-ray-tune-") if remote else job.out)
    out.mkdir(parents=True, exist_ok=True)
    caches = build_caches(job, manifest)  # tune.with_parameters puts them in Ray's object store once
    search = search_phase(job, folds, classes, caches, resume=resume)
    for t in search:
        if t.error:
            log.warning("trial %s fold %d failed: %s", t.backbone, t.fold, t.error)
    winner = pick_winner(search, folds)
    log.info("winner: %s (mean inner-validation ROC-AUC %.3f)", winner["backbone"], winner["mean_search_auc"])
    final = final_phase(job, folds, classes, caches, search, winner, resume=resume)
    # the whole schedule: mid-schedule weights at peak learning rate swing from epoch to epoch (one
    # measured run: held-out accuracy 0.46, 0.83, 0.46, 0.74 over four epochs), the weights at its end
    # are settled (0.87-0.88 over the last eight); with no validation part, a median "best epoch"
    # lands wherever the swing is
    epochs = job.max_epochs
    export = export_phase(job, folds, classes, caches, winner, epochs, resume=resume)

    table = build_table(search, final, folds, winner)
    outputs = _write_table(table, out)
    outs = _outputs(job, final)
    calib = calibration(outs, classes)
    k = len(classes)
    probs = metrics.calibrated(outs["test_outputs"][:, :k], calib["temperature"])
    oof = metrics.classification_metrics(outs["test_labels"], probs)
    oof["per_class"] = metrics.per_class_metrics(outs["test_labels"], probs, classes)
    if outs["test_outputs"].shape[1] > k:
        pct = engine.confluence_from_outputs(outs["test_outputs"], classes, calib["temperature"])
        oof["confluence_mae"] = float(np.mean(np.abs(pct - 100 * outs["test_confluence"])))
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
    if remote:
        storage.upload_dir(out, job.out, job.endpoint_url)
        outputs = {k: storage.join(job.out, Path(v).relative_to(out).as_posix()) for k, v in outputs.items()}
        shutil.rmtree(out, ignore_errors=True)
    outputs["artifact"] = storage.join(job.out, "artifact")
    return SearchOutcome(search=search, final=final, table=table, winner=winner, outputs=outputs)
