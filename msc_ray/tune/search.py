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
