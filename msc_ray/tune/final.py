"""The final phase: the winning configuration on every outer fold, then Table 1 and the winner's plots."""

from __future__ import annotations

import io
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from .. import metrics, storage
from .experiment import TrialResult, _run_experiment, _space
from .job import TuneJobConfig

TABLE_KEYS = ("test_auc", "test_acc", "test_pr_auc", "test_ece_after", "test_ece_floor", "test_confluence_mae")


def build_table(
    search: list[TrialResult], final: list[TrialResult], folds: int, winner: dict, inner_fold: str = "validate"
) -> list[dict]:
    """Table 1: per backbone, mean ± SD over the outer folds. On each fold the trial picked is the
    complete one with the best *inner* validation ROC-AUC, and its figures are those of the outer
    fold, which nothing chose. A backbone that ASHA cut short on any fold is marked cut and gets no
    mean (averaging only the folds it survived would flatter it). The winner's row comes from its
    complete run on every fold. ``inner_fold`` "train": one trial per fold, validated on nothing."""
    what = {
        "validate": "search: best trial per fold by inner validation",
        "train": "search: one trial per fold, the inner fold trained",
    }[inner_fold]
    rows = []
    by_backbone: dict[str, list[TrialResult]] = defaultdict(list)
    for t in search:
        by_backbone[t.backbone].append(t)
    for name, trials in by_backbone.items():
        picked, cut = [], []
        for f in range(folds):
            complete = [t for t in trials if t.fold == f and t.complete and _validated_or_alone(t, trials)]
            if complete:
                picked.append(max(complete, key=lambda t: t.best_val_auc))  # a NaN only where it stands alone
            else:
                cut.append(f)
        status = "complete" if not cut else f"cut by ASHA on fold(s) {','.join(map(str, cut))}: no mean"
        rows.append(
            _row(
                name,
                what,
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


def _validated_or_alone(t: TrialResult, trials: list[TrialResult]) -> bool:
    """A trial Table 1 may pick on its fold: one the inner validation scored, or, where nothing was
    validated (cross-fitted folds: one configuration), the fold's only trial."""
    return not math.isnan(t.best_val_auc) or sum(u.fold == t.fold for u in trials) == 1


def _row(name: str, what: str, trials: list[TrialResult], folds: int, status: str, complete: int) -> dict:
    row = {"backbone": name, "run": what, "folds_complete": f"{complete}/{folds}"}
    for key in TABLE_KEYS:
        mean, sd = metrics.mean_sd([getattr(t, key) for t in trials])
        row[key.removeprefix("test_") + "_mean"] = mean
        row[key.removeprefix("test_") + "_sd"] = sd
    row["status"] = status
    return row


CHOSEN_ON = {
    "validate": "Early stopping, ASHA, backbone choice and the temperature used the inner validation fold.",
    "train": "One configuration, nothing chosen: each fold's model trained on every other fold for its whole "
    "schedule, and its temperature was fitted on the other folds' outer outputs (cross-fitted calibration).",
}


def _write_table(rows: list[dict], out: Path, pooled: dict | None = None, inner_fold: str = "validate") -> dict:
    """Table 1 as CSV and Markdown; ``pooled`` (tune.run.pooled_outer_figures) adds the winner's outer
    folds taken together, each calibrated with its own fold's temperature; ``inner_fold`` says what the
    temperatures and choices were read on (``TuneJobConfig.inner_fold``)."""
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
        "Figures are on the outer folds: nothing was trained, stopped or calibrated on them. "
        + CHOSEN_ON[inner_fold]
        + " ECE floor: the ECE a perfectly calibrated model would show on the same images (labels drawn from "
        "its own probabilities); ECE is biased upwards on small folds, so read the calibrated ECE against it.",
    ]
    if pooled and "held_out_ece" in pooled:
        lines += [
            "",
            f"Winner's outer folds pooled ({pooled['images']} images, each fold calibrated with its own "
            f"temperature): accuracy {pooled['accuracy']:.3f}, ECE {pooled['held_out_ece']:.3f} (floor "
            f"{pooled['held_out_ece_floor']:.3f}).",
        ]
    md_path.write_text("\n".join(lines) + "\n")
    return {"table_csv": str(csv_path), "table_md": str(md_path)}


def fold_outputs(job: TuneJobConfig, final: list[TrialResult]) -> dict[int, dict[str, np.ndarray]]:
    """The winner's saved outputs (``outputs.npz``) per outer fold, for the folds that left them."""
    parts = {}
    for t in final:
        if not t.checkpoint:
            continue
        raw = storage.read_checkpoint_file(job.out, t.checkpoint, "outputs.npz", job.endpoint_url)
        if raw is not None:
            with np.load(io.BytesIO(raw), allow_pickle=False) as z:
                parts[t.fold] = {k: z[k] for k in z.files}
    if not parts:
        raise RuntimeError("the winner's fold runs left no outputs")
    return parts


def _outputs(parts: dict[int, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The folds' inner-validation and outer-fold outputs (:func:`fold_outputs`), concatenated."""
    ordered = [parts[f] for f in sorted(parts)]
    common = set.intersection(*(set(p) for p in ordered))  # a resumed run may hold folds saved by an older version
    return {k: np.concatenate([p[k] for p in ordered]) for k in common}


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


def final_phase(
    job, folds, classes, caches, search, winner, *, resume: bool, with_export: bool = False
) -> list[TrialResult]:
    """The winner's configuration on every outer fold, without ASHA. Folds on which the search
    already ran exactly that configuration to completion are reused, not trained again.

    ``with_export``: the export run (fold -1: all images, the whole schedule) is one more trial of the
    same experiment, started first — the longest trial — so that it trains while the fold trials do and
    the run starts one experiment (its trial processes, their torch import) fewer."""
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
    grid = ([-1] if with_export else []) + missing
    ran = []
    if grid:
        space = _space(
            job,
            "final",
            folds,
            classes,
            backbone=winner["backbone"],
            fold=tune.grid_search(grid),
            lr=winner["lr"],
            weight_decay=winner["weight_decay"],
        )
        # the export run reports no validation metric: the experiment ranks nothing then
        ran = _run_experiment(job, "final", space, caches, asha=False, resume=resume, ranked=not with_export)
    return sorted(list(same.values()) + ran, key=lambda t: t.fold)
