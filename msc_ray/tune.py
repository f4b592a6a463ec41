"""Backbone × fold search for the confluence classifier on Ray Tune.

Three Tune experiments under ``RUN/``, each resumable with ``Tuner.restore``:

1. ``search``: one trial per (backbone, fold, sampled learning rate and weight decay). AMSGrad Adam
   (its ``weight_decay`` is L2 regularisation), class-weighted cross-entropy, patience-based early
   stopping on validation micro ROC-AUC inside a trial, and ASHA across the trials *of the same fold*
   (one ASHA bracket per fold, so an easy fold never cuts a hard one's trials).
2. ``final``: the winning configuration (backbone, learning rate, weight decay) trained on every fold
   with patience but no ASHA, so the winner's row is complete; its out-of-fold validation logits give
   the ROC/PR curves, the confusion matrix, and the temperature fitted for calibration.
3. ``export``: the winner trained on all images for the median best epoch of its folds. That single
   model, with the fitted temperature, is the artifact scoring loads (one forward pass per image,
   where a five-model fold ensemble would cost five).

A trial is the plain function :func:`classifier_trial` taking one config dict. It asks for its CPUs
and a GPU or a fraction; its Ray Data decode/augment tasks are ordinary cluster tasks (on a cluster:
the CPU workers), and the number of concurrent trials leaves ``data_cpus`` CPUs free for them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import tempfile
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from . import corpus, data, metrics, models
from .config import DataConfig, from_dict

log = logging.getLogger(__name__)

METRIC = "val_auc"


@dataclass(frozen=True)
class TuneJobConfig:
    manifest: str  # manifest URI (the CLI indexes a corpus into RUN/manifest.parquet first)
    out: str  # run folder (local)
    stack: str = "sstack"
    backbones: tuple[str, ...] = ("resnet18", "mobilenet_v3_small")
    max_epochs: int = 10
    patience: int = 3
    samples: int = 2  # hyper-parameter samples per (backbone, fold)
    lr_min: float = 1e-4
    lr_max: float = 3e-3
    wd_min: float = 1e-6
    wd_max: float = 1e-3
    batch_size: int = 32
    size: int = 128
    channels: int = 3
    dropout: float = 0.5
    pretrained: str = "auto"  # auto | none | path to a state dict
    asha: bool = True
    grace_period: int = 1
    reduction_factor: int = 2
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    data_cpus: float = 1.0  # CPUs kept free of trials for the Ray Data tasks that feed them
    max_concurrent: int = 0  # 0: as many as resources allow
    seed: int = 0
    endpoint_url: str | None = None

    def validate(self, classes_by_stack: dict[str, list[str]]) -> None:
        for b in self.backbones:
            models.backbone(b)
        if self.stack not in classes_by_stack:
            raise ValueError(f"--stack {self.stack}: the manifest has {', '.join(classes_by_stack) or 'no'} stacks")
        if self.max_epochs < 1 or self.patience < 1 or self.samples < 1:
            raise ValueError("--max-epochs, --patience and --samples must be at least 1")


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _data_config(job: TuneJobConfig, backbone: str, pretrained: bool) -> DataConfig:
    return DataConfig(
        size=models.input_size(backbone, job.size, pretrained),
        channels=job.channels,
        equalize=job.stack == "mstack",
        seed=job.seed,
        endpoint_url=job.endpoint_url,
        decode_batch=min(32, job.batch_size),
    )


def _evaluate(model, images: torch.Tensor, labels: torch.Tensor, device, batch: int) -> np.ndarray:
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            out.append(model(images[i : i + batch].to(device)).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0))


def classifier_trial(config: dict) -> None:
    """One Tune trial. ``config``: ``job`` (TuneJobConfig as a dict), ``phase`` (search | final |
    export), ``backbone``, ``fold`` (-1 for all data), ``lr``, ``weight_decay``, and for export
    ``epochs``. Reports per-epoch metrics and a checkpoint holding the current and the best state."""
    from ray import tune

    job = from_dict(TuneJobConfig, config["job"])
    phase, name, fold = config["phase"], config["backbone"], int(config["fold"])
    manifest = corpus.read_manifest(job.manifest, job.endpoint_url)
    classes = corpus.manifest_info(manifest)["classes"][job.stack]
    weights_file = models.resolve_pretrained(name, job.pretrained)
    dcfg = _data_config(job, name, weights_file is not None)
    device = _device()
    torch.manual_seed(job.seed + 1000 * max(fold, 0))

    model = models.build_classifier(
        name,
        len(classes),
        in_channels=job.channels,
        image_size=dcfg.size,
        dropout=job.dropout,
        weights_file=weights_file,
    ).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"], amsgrad=True)
    all_data = fold < 0
    train_rows = data.select(manifest, stack=job.stack, fold=None if all_data else fold, train=True)
    counts = np.bincount(train_rows.column("label").to_numpy(), minlength=len(classes)).astype(np.float64)
    weights = counts.sum() / (len(classes) * np.maximum(counts, 1))  # "balanced" class weights
    loss_fn = torch.nn.CrossEntropyLoss(weight=torch.tensor(weights, dtype=torch.float32, device=device))
    epochs = int(config.get("epochs") or job.max_epochs)

    state = {"epoch": 0, "best_auc": -1.0, "best_epoch": 0, "bad_epochs": 0}
    best_model = None
    best_val = None
    ckpt = tune.get_checkpoint()
    if ckpt is not None:  # resumed: continue where the trial stopped
        with ckpt.as_directory() as d:
            saved = torch.load(os.path.join(d, "state.pt"), map_location=device, weights_only=True)
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["optimizer"])
            best_model = saved["best_model"]
            state.update({k: saved[k] for k in state})
            if os.path.exists(os.path.join(d, "val.npz")):
                with np.load(os.path.join(d, "val.npz"), allow_pickle=False) as z:
                    best_val = {k: z[k] for k in z.files}

    val_x = val_y = val_rows = None
    if not all_data:
        vr = data.select(manifest, stack=job.stack, fold=fold, train=False)
        xs, ys, rs = [], [], []
        for x, y, r in data.torch_batches(data.make_dataset(vr, dcfg, train=False), job.batch_size):
            xs.append(x), ys.append(y), rs.append(r)
        val_x, val_y, val_rows = torch.cat(xs), torch.cat(ys), torch.cat(rs)

    use_amp = device.type == "cuda"
    for epoch in range(state["epoch"], epochs):
        model.train()
        stats = data.BatchStats()
        total, n = 0.0, 0
        for x, y, _ in data.torch_batches(
            data.make_dataset(train_rows, dcfg, train=True, epoch=epoch),
            job.batch_size,
            stats=stats,
            drop_last=False,
        ):
            if len(y) < 2 and model.training:  # BatchNorm cannot train on one image
                continue
            x, y = x.to(device, non_blocking=True), y.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                loss = loss_fn(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss) * len(y)
            n += len(y)
        report = {
            "epoch": epoch + 1,
            "train_loss": total / max(n, 1),
            "train_images": stats.images,
            "error_records": stats.errors,
            "phase": phase,
            "backbone": name,
            "fold": fold,
        }
        state["epoch"] = epoch + 1
        done_reason = None
        if all_data:
            best_model = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            state["best_epoch"] = epoch + 1
            if epoch + 1 == epochs:
                done_reason = "epochs"
        else:
            logits = _evaluate(model, val_x, val_y, device, job.batch_size * 2)
            m = metrics.classification_metrics(val_y.numpy(), metrics.calibrated(logits))
            report.update({METRIC: m["roc_auc"], "val_acc": m["accuracy"], "val_pr_auc": m["pr_auc"]})
            if m["roc_auc"] > state["best_auc"]:
                state.update(best_auc=m["roc_auc"], best_epoch=epoch + 1, bad_epochs=0)
                best_model = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
                best_val = {
                    "rows": val_rows.numpy(),
                    "labels": val_y.numpy(),
                    "logits": logits,
                    "acc": np.float64(m["accuracy"]),
                    "pr_auc": np.float64(m["pr_auc"]),
                }
            else:
                state["bad_epochs"] += 1
            if state["bad_epochs"] >= job.patience:
                done_reason = "patience"
            elif epoch + 1 == epochs:
                done_reason = "max_epochs"
            report.update(
                best_val_auc=state["best_auc"],
                best_val_acc=float(best_val["acc"]),
                best_val_pr_auc=float(best_val["pr_auc"]),
            )
        report.update(best_epoch=state["best_epoch"], done_reason=done_reason or "")
        with tempfile.TemporaryDirectory() as d:
            torch.save(
                {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "best_model": best_model,
                    **state,
                },
                os.path.join(d, "state.pt"),
            )
            if best_val is not None:
                np.savez(os.path.join(d, "val.npz"), **best_val)
            tune.report(report, checkpoint=tune.Checkpoint.from_directory(d))
        if done_reason:
            break


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
                    grace_period=job.grace_period,
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
    best_val_auc: float = float("nan")
    best_val_acc: float = float("nan")
    best_val_pr_auc: float = float("nan")
    best_epoch: int = 0
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


def concurrent_trials(job: TuneJobConfig) -> int:
    """How many trials run at once: ``--max-concurrent`` if given, else what the cluster's CPUs (and
    GPUs) hold while ``data_cpus`` CPUs stay free for the trials' Ray Data tasks. Those tasks are
    ordinary cluster tasks, so on a cluster they run on the CPU worker nodes."""
    import ray

    if job.max_concurrent:
        return job.max_concurrent
    res = ray.cluster_resources()
    n = int(max(res.get("CPU", 1) - job.data_cpus, job.cpus_per_trial) // job.cpus_per_trial)
    if job.gpus_per_trial:
        n = min(n, int(res.get("GPU", 0) // job.gpus_per_trial) or 1)
    return max(n, 1)


def _run_experiment(
    job: TuneJobConfig, name: str, param_space: dict, *, asha: bool, resume: bool, num_samples: int = 1
):
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    storage = os.path.abspath(job.out)
    path = os.path.join(storage, name)
    trainable = tune.with_resources(classifier_trial, _resources(job))
    if os.path.isdir(path) and tune.Tuner.can_restore(path):
        if not resume:
            raise ValueError(f"{path} holds an earlier experiment: pass --resume to finish it, or use a new --out")
        log.info("resuming %s", path)
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
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
                search_alg=BasicVariantGenerator(random_state=job.seed, max_concurrent=concurrent_trials(job)),
                trial_dirname_creator=lambda t: f"{t.config['backbone']}-fold{t.config['fold']}-{t.trial_id}",
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=storage,
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                failure_config=tune.FailureConfig(max_failures=1),
                verbose=1,
            ),
        )
    grid = tuner.fit()
    if grid.num_terminated + grid.num_errors < len(grid):
        raise ValueError(f"the {name} experiment was interrupted; finish it with --resume (same --out)")
    return grid


def _collect(grid) -> list[TrialResult]:
    out = []
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
                best_val_auc=float(m.get("best_val_auc", float("nan"))),
                best_val_acc=float(m.get("best_val_acc", float("nan"))),
                best_val_pr_auc=float(m.get("best_val_pr_auc", float("nan"))),
                best_epoch=int(m.get("best_epoch", 0)),
                checkpoint=r.checkpoint.path if r.checkpoint else None,
                error=str(r.error).splitlines()[0] if r.error else None,
            )
        )
    return out


def build_table(search: list[TrialResult], final: list[TrialResult], folds: int, winner: dict) -> list[dict]:
    """Table 1: per backbone, mean ± SD over folds of the best trial of each fold. Only complete
    trials are averaged; a backbone with folds whose trials ASHA cut short says so. The winner's row
    comes from its complete ``final`` run on every fold."""
    rows = []
    by_backbone: dict[str, list[TrialResult]] = defaultdict(list)
    for t in search:
        by_backbone[t.backbone].append(t)
    for name, trials in by_backbone.items():
        picked, cut = [], []
        for f in range(folds):
            of_fold = [t for t in trials if t.fold == f and not math.isnan(t.best_val_auc)]
            complete = [t for t in of_fold if t.complete]
            if complete:
                picked.append(max(complete, key=lambda t: t.best_val_auc))
            else:
                cut.append(f)
        if not cut:
            status = "complete"
        elif len(cut) == folds:
            status = "cut short by ASHA on every fold: no complete fold to average"
        else:
            status = f"cut short by ASHA on fold(s) {','.join(map(str, cut))}: mean over the complete folds only"
        rows.append(_row(name, "search: best trial per fold", picked, folds, status))
    if final:
        label = f"winner, lr={winner['lr']:.2e} wd={winner['weight_decay']:.2e}, all folds"
        done = [t for t in final if t.complete]
        status = "complete" if len(done) == folds else f"{len(done)}/{folds} folds finished"
        rows.append(_row(winner["backbone"], label, done, folds, status))
    return rows


def _row(name: str, what: str, trials: list[TrialResult], folds: int, status: str) -> dict:
    auc = metrics.mean_sd([t.best_val_auc for t in trials])
    acc = metrics.mean_sd([t.best_val_acc for t in trials])
    pr = metrics.mean_sd([t.best_val_pr_auc for t in trials])
    return {
        "backbone": name,
        "run": what,
        "folds_complete": f"{len(trials)}/{folds}",
        "roc_auc_mean": auc[0],
        "roc_auc_sd": auc[1],
        "accuracy_mean": acc[0],
        "accuracy_sd": acc[1],
        "pr_auc_mean": pr[0],
        "pr_auc_sd": pr[1],
        "status": status,
    }


def pick_winner(search: list[TrialResult], folds: int) -> dict:
    """The backbone with the best mean (over folds) of its per-fold best validation AUC, with the
    learning rate and weight decay of its best single trial."""
    scores = {}
    for name in {t.backbone for t in search}:
        per_fold = []
        for f in range(folds):
            aucs = [
                t.best_val_auc for t in search if t.backbone == name and t.fold == f and not math.isnan(t.best_val_auc)
            ]
            per_fold.append(max(aucs) if aucs else 0.0)
        scores[name] = float(np.mean(per_fold))
    if not scores:
        raise RuntimeError("no trial reported a result; see the trial errors above")
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
        "| backbone | run | folds | micro ROC-AUC | accuracy | micro PR-AUC | status |",
        "|---|---|---|---|---|---|---|",
    ]

    def cell(r: dict, k: str) -> str:
        return "n/a" if math.isnan(r[k + "_mean"]) else f"{r[k + '_mean']:.3f} ± {r[k + '_sd']:.3f}"

    for r in rows:
        lines.append(
            f"| {r['backbone']} | {r['run']} | {r['folds_complete']} | {cell(r, 'roc_auc')} | "
            f"{cell(r, 'accuracy')} | {cell(r, 'pr_auc')} | {r['status']} |"
        )
    md_path.write_text("\n".join(lines) + "\n")
    return {"table_csv": str(csv_path), "table_md": str(md_path)}


def _oof(final: list[TrialResult]) -> dict[str, np.ndarray]:
    """Out-of-fold validation logits of the winner's best epoch on each fold, concatenated."""
    parts = []
    for t in final:
        if t.checkpoint and os.path.exists(os.path.join(t.checkpoint, "val.npz")):
            with np.load(os.path.join(t.checkpoint, "val.npz"), allow_pickle=False) as z:
                parts.append({k: z[k] for k in ("rows", "labels", "logits")})
    if not parts:
        raise RuntimeError("the winner's fold runs left no validation logits")
    return {k: np.concatenate([p[k] for p in parts]) for k in ("rows", "labels", "logits")}


def _plot_winner(oof: dict, classes: list[str], temperature: float, title: str, dest: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay, precision_recall_curve, roc_curve

    probs = metrics.calibrated(oof["logits"], temperature)
    yy = metrics.one_hot(oof["labels"], len(classes))
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.6))
    fpr, tpr, _ = roc_curve(yy.ravel(), probs.ravel())
    m = metrics.classification_metrics(oof["labels"], probs)
    ax[0].plot(fpr, tpr, label=f"micro ROC-AUC {m['roc_auc']:.3f}")
    ax[0].plot([0, 1], [0, 1], "k--", lw=0.8)
    ax[0].set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (micro, out of fold)")
    ax[0].legend(loc="lower right")
    prec, rec, _ = precision_recall_curve(yy.ravel(), probs.ravel())
    ax[1].plot(rec, prec, label=f"micro PR-AUC {m['pr_auc']:.3f}")
    ax[1].set(xlabel="recall", ylabel="precision", title="precision-recall (micro, out of fold)")
    ax[1].legend(loc="lower left")
    ConfusionMatrixDisplay(np.array(m["confusion"]), display_labels=classes).plot(ax=ax[2], colorbar=False)
    ax[2].set_title(f"confusion, accuracy {m['accuracy']:.3f}")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(dest, dpi=110)
    plt.close(fig)
    return str(dest)


def search_phase(job: TuneJobConfig, folds: int, *, resume: bool = False, name: str = "search") -> list[TrialResult]:
    """The backbone × fold × sampled-hyper-parameter trials (ASHA per fold when ``job.asha``)."""
    from ray import tune

    space = {
        "job": asdict(job),
        "phase": "search",
        "backbone": tune.grid_search(list(job.backbones)),
        "fold": tune.grid_search(list(range(folds))),
        "lr": tune.loguniform(job.lr_min, job.lr_max),
        "weight_decay": tune.loguniform(job.wd_min, job.wd_max),
    }
    return _collect(_run_experiment(job, name, space, asha=job.asha, resume=resume, num_samples=job.samples))


def run_search(job: TuneJobConfig, *, resume: bool = False) -> SearchOutcome:
    """Search, finalise the winner on every fold, export the artifact; write table, plots and JSON."""
    from ray import tune

    manifest = corpus.read_manifest(job.manifest, job.endpoint_url)
    info = corpus.manifest_info(manifest)
    job.validate(info["classes"])
    folds = int(info["folds"])
    classes = info["classes"][job.stack]
    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    jd = asdict(job)

    search = search_phase(job, folds, resume=resume)
    for t in search:
        if t.error:
            log.warning("trial %s fold %d failed: %s", t.backbone, t.fold, t.error)
    winner = pick_winner(search, folds)
    log.info("winner: %s", winner)

    fspace = {
        "job": jd,
        "phase": "final",
        "backbone": winner["backbone"],
        "fold": tune.grid_search(list(range(folds))),
        "lr": winner["lr"],
        "weight_decay": winner["weight_decay"],
    }
    final = _collect(_run_experiment(job, "final", fspace, asha=False, resume=resume))
    epochs = max(1, int(round(statistics.median([t.best_epoch for t in final if t.best_epoch] or [job.max_epochs]))))
    espace = {
        "job": jd,
        "phase": "export",
        "backbone": winner["backbone"],
        "fold": -1,
        "lr": winner["lr"],
        "weight_decay": winner["weight_decay"],
        "epochs": epochs,
    }
    export = _collect(_run_experiment(job, "export", espace, asha=False, resume=resume))

    table = build_table(search, final, folds, winner)
    outputs = _write_table(table, out)
    oof = _oof(final)
    temperature = metrics.fit_temperature(oof["logits"], oof["labels"])
    probs_raw, probs_cal = metrics.calibrated(oof["logits"]), metrics.calibrated(oof["logits"], temperature)
    calib = {
        "temperature": temperature,
        "ece_before": metrics.expected_calibration_error(oof["labels"], probs_raw),
        "ece_after": metrics.expected_calibration_error(oof["labels"], probs_cal),
    }
    oof_metrics = metrics.classification_metrics(oof["labels"], probs_cal)
    outputs["plots"] = _plot_winner(
        oof,
        classes,
        temperature,
        f"{job.stack}: {winner['backbone']} (winner), {folds} folds",
        out / "winner.png",
    )

    ckpt = export[0].checkpoint if export and export[0].checkpoint else None
    if ckpt is None:
        raise RuntimeError(f"the export run left no checkpoint: {export[0].error if export else 'no trial'}")
    saved = torch.load(os.path.join(ckpt, "state.pt"), map_location="cpu", weights_only=True)
    weights_file = models.resolve_pretrained(winner["backbone"], job.pretrained)
    dcfg = _data_config(job, winner["backbone"], weights_file is not None)
    art_cfg = models.save_artifact(
        out / "artifact",
        saved["best_model"],
        {
            "kind": "classifier",
            "architecture": winner["backbone"],
            "classes": classes,
            "stack": job.stack,
            "data": asdict(replace(dcfg, endpoint_url=None)),
            "dropout": job.dropout,
            "normalisation": {"mean": list(dcfg.norm_mean), "std": list(dcfg.norm_std)},
            "temperature": temperature,
            "calibration": calib,
            "trained_on": "all images",
            "epochs": epochs,
            "pretrained": str(weights_file) if weights_file else "none",
            "hyperparameters": {"lr": winner["lr"], "weight_decay": winner["weight_decay"]},
            "metrics_out_of_fold": {k: v for k, v in oof_metrics.items() if k != "confusion"},
            "run": {"out": str(out.resolve()), "manifest": job.manifest, "corpus": info.get("corpus")},
        },
    )
    outputs["artifact"] = str(out / "artifact")
    summary = {
        "winner": winner,
        "calibration": calib,
        "out_of_fold": oof_metrics,
        "artifact_version": art_cfg["version"],
        "export_epochs": epochs,
        "epochs_run": {
            "search": sum(t.epochs_run for t in search),
            "final": sum(t.epochs_run for t in final),
        },
        "table": table,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    outputs["summary"] = str(out / "summary.json")
    return SearchOutcome(search=search, final=final, table=table, winner=winner, outputs=outputs)
