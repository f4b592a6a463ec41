"""The search phase: every (backbone, outer fold, sampled learning rate and weight decay), and the winner
by mean inner-validation ROC-AUC."""

from __future__ import annotations

import math

import numpy as np

from .experiment import TrialResult, _run_experiment, _space
from .job import TuneJobConfig


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


def known_winner(job: TuneJobConfig) -> dict | None:
    """The winner's configuration when the search holds one per fold (one backbone, one learning rate
    and weight decay, nothing sampled): known before any trial runs, so its export can train beside
    the fold trials. None when the search has a choice to make."""
    if not job.one_configuration:
        return None
    return {"backbone": job.backbones[0], "lr": job.lr_min, "weight_decay": job.wd_min}


def search_phase(
    job: TuneJobConfig,
    folds: int,
    classes: list[str],
    caches: dict,
    *,
    resume: bool = False,
    name: str = "search",
    with_export: bool = False,
) -> list[TrialResult]:
    """The backbone × outer fold × sampled-hyper-parameter trials (ASHA per fold when ``job.asha``).
    ``with_export`` (only where :func:`known_winner` names the winner): the export run (fold -1: all
    images, the whole schedule) is one more trial of the same experiment, started first — the longest
    trial — so that it trains while the fold trials do, instead of alone after them."""
    from ray import tune

    if with_export and known_winner(job) is None:
        raise ValueError("the export can only join a search whose winner is known before it runs")

    lr = tune.loguniform(job.lr_min, job.lr_max) if job.lr_max > job.lr_min else job.lr_min
    wd = tune.loguniform(job.wd_min, job.wd_max) if job.wd_max > job.wd_min else job.wd_min
    space = _space(
        job,
        "search",
        folds,
        classes,
        backbone=tune.grid_search(list(job.backbones)),
        fold=tune.grid_search(([-1] if with_export else []) + list(range(folds))),
        lr=lr,
        weight_decay=wd,
    )
    samples = job.samples if job.sampled else 1
    # one trial per fold leaves ASHA nothing to compare; the export run reports no validation metric
    asha = job.asha and not with_export
    return _run_experiment(
        job, name, space, caches, asha=asha, resume=resume, num_samples=samples, ranked=not with_export
    )
