"""Potency from morphology: LightGBM on per-vessel-day features, searched with Ray Tune, nested by vessel.

Input: a Parquet table with one row per image — ``vessel``, ``day``, the numeric morphology features
(:mod:`msc_ray.morphology`) and the measured potency (``--target``). Rows are averaged per vessel-day
(the unit a potency assay measures).

Honest figures: the vessels are split into outer folds (``GroupKFold``); for each outer fold a
LightGBM parameter set is chosen by inner grouped cross-validation on the other folds' vessels only,
fitted on them, and predicts the held-out vessels. R², Spearman ρ and MAE are computed on those
held-out predictions. One Ray Tune run evaluates every sampled parameter set on every outer fold's
inner splits (a trial per parameter set), so each outer fold picks its own best from data it owns.

The exported model is fitted on every vessel with the parameter set that is best on average inner CV
over all vessels; the artifact is LightGBM's own text format (``model.txt``) plus ``config.json``
(features, target, parameters, the held-out figures) — nothing pickled.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import storage

log = logging.getLogger(__name__)

ID_COLUMNS = {"vessel", "day", "image", "key", "uri", "stack", "position", "fold"}


@dataclass(frozen=True)
class PotencyJobConfig:
    features: str  # Parquet URI: one row per image
    out: str  # run folder: local path or s3://bucket/prefix
    target: str = "potency"
    folds: int = 5  # outer folds over vessels
    inner_folds: int = 3
    samples: int = 12  # LightGBM parameter sets sampled by Ray Tune
    seed: int = 0
    cpus_per_trial: float = 1.0
    endpoint_url: str | None = None

    def validate(self) -> None:
        if self.folds < 2 or self.inner_folds < 2:
            raise ValueError(f"--folds {self.folds} / inner folds {self.inner_folds}: need at least 2")
        if self.samples < 1:
            raise ValueError(f"--samples {self.samples}: need at least 1")


def vessel_days(table, target: str):
    """Per-image table → (per vessel-day DataFrame, feature columns). Features: the morphology summary
    columns (:data:`msc_ray.morphology.IMAGE_COLUMNS`) the table has — what scoring measures on new
    images, so other metadata (a measured confluence, say) never becomes an input; a table with none
    of them uses every numeric column but the target and identifiers. Rows of a vessel-day are
    averaged (NaN-aware)."""
    import pandas as pd

    from .morphology import IMAGE_COLUMNS

    df = table.to_pandas() if hasattr(table, "to_pandas") else pd.DataFrame(table)
    missing = [c for c in ("vessel", "day", target) if c not in df.columns]
    if missing:
        raise ValueError(f"features table: no column {', '.join(missing)} (need vessel, day and the target)")
    df = df[df["vessel"].notna() & df[target].notna()]
    feats = [
        c
        for c in df.columns
        if c not in ID_COLUMNS and c != target and pd.api.types.is_numeric_dtype(df[c]) and df[c].dtype != bool
    ]
    morph = [c for c in IMAGE_COLUMNS if c in feats]
    feats = morph or feats
    if not feats:
        raise ValueError("features table: no numeric feature columns")
    return per_vessel_day(df, feats + [target]), feats


def per_vessel_day(df, columns: list[str]):
    """Per-image rows → one row per (vessel, day): the NaN-aware mean of ``columns``."""
    return df.groupby(["vessel", "day"], as_index=False)[columns].mean()


def _model(params: dict, seed: int):
    import lightgbm as lgb

    return lgb.LGBMRegressor(**params, random_state=seed, n_jobs=1, verbose=-1, subsample_freq=1)


def _inner_r2(params: dict, x, y, groups, k: int, seed: int) -> float:
    from sklearn.metrics import r2_score
    from sklearn.model_selection import GroupKFold

    k = min(k, len(np.unique(groups)))
    pred = np.empty_like(y)
    for tr, te in GroupKFold(n_splits=k).split(x, y, groups):
        pred[te] = _model(params, seed).fit(x[tr], y[tr]).predict(x[te])
    return float(r2_score(y, pred))


def _trial(config: dict, x, y, groups, outer: list, inner_folds: int, seed: int) -> dict:
    """Ray Tune trial: inner-CV R² of one parameter set on each outer fold's training vessels, and on
    all vessels (for the exported model)."""
    scores = {
        f"inner_r2_{f}": _inner_r2(config, x[tr], y[tr], groups[tr], inner_folds, seed)
        for f, (tr, _) in enumerate(outer)
    }
    scores["inner_r2_all"] = _inner_r2(config, x, y, groups, inner_folds, seed)
    return scores


def search_space() -> dict:
    from ray import tune

    return {
        "n_estimators": tune.randint(100, 600),
        "learning_rate": tune.loguniform(0.02, 0.2),
        "num_leaves": tune.randint(4, 32),
        "min_child_samples": tune.randint(3, 15),
        "subsample": tune.uniform(0.7, 1.0),
        "colsample_bytree": tune.uniform(0.6, 1.0),
        "reg_lambda": tune.loguniform(1e-3, 10.0),
    }


def run_search(job: PotencyJobConfig, x, y, groups, outer: list) -> list[dict]:
    """Every sampled parameter set with its inner-CV scores (one Ray Tune trial each)."""
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    from .tune import fit_tuner

    trainable = tune.with_resources(
        tune.with_parameters(_trial, x=x, y=y, groups=groups, outer=outer, inner_folds=job.inner_folds, seed=job.seed),
        {"cpu": job.cpus_per_trial},
    )
    with tempfile.TemporaryDirectory() as tmp:
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(),
            tune_config=tune.TuneConfig(
                num_samples=job.samples,
                search_alg=BasicVariantGenerator(random_state=job.seed),
                reuse_actors=True,  # one process runs trial after trial (LightGBM fits take well under a second)
            ),
            run_config=tune.RunConfig(name="potency", storage_path=tmp, verbose=0),
        )
        grid = fit_tuner(tuner, quiet=True)  # the table of trials is the summary's; no console status
        rows = []
        for r in grid:
            if r.error:
                raise RuntimeError(f"potency trial failed: {str(r.error).splitlines()[-1]}")
            rows.append({"params": {k: v for k, v in r.config.items()}, **r.metrics})
    return rows


def train_potency(job: PotencyJobConfig) -> dict:
    """Nested search and figures, the exported artifact, plots; returns the summary."""
    import pyarrow.parquet as pq
    from scipy.stats import spearmanr
    from sklearn.metrics import mean_absolute_error, r2_score
    from sklearn.model_selection import GroupKFold

    job.validate()
    if not storage.exists(job.features, job.endpoint_url):
        raise ValueError(f"{job.features}: no such features table")
    loc = storage.resolve(job.features, job.endpoint_url)
    table = pq.read_table(loc.path, filesystem=loc.fs)
    df, feats = vessel_days(table, job.target)
    vessels = df["vessel"].astype(str).to_numpy()
    n_vessels = len(np.unique(vessels))
    if n_vessels < job.folds:
        raise ValueError(f"{job.features}: {n_vessels} vessels, fewer than --folds {job.folds}")
    x = df[feats].to_numpy(np.float64)
    y = df[job.target].to_numpy(np.float64)
    outer = list(GroupKFold(n_splits=job.folds).split(x, y, vessels))
    trials = run_search(job, x, y, vessels, outer)

    pred, fold_of, chosen = _outer_predictions(trials, outer, x, y, job.seed)
    metrics = {
        "r2": float(r2_score(y, pred)),
        "spearman": float(spearmanr(y, pred).statistic),
        "mae": float(mean_absolute_error(y, pred)),
        "vessel_days": int(len(y)),
        "vessels": int(n_vessels),
    }
    final = max(trials, key=lambda t: t["inner_r2_all"])
    model = _model(final["params"], job.seed).fit(x, y)
    config = {
        "kind": "potency",
        "features": feats,
        "target": job.target,
        "params": final["params"],
        "seed": job.seed,
        "heldout": metrics,
        "job": asdict(job),
    }
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) if storage.is_s3(job.out) else Path(job.out)
        out.mkdir(parents=True, exist_ok=True)
        save_artifact(out / "artifact", model.booster_, config)
        df.assign(predicted=pred, fold=fold_of).rename(columns={job.target: "truth"})[
            ["vessel", "day", "truth", "predicted", "fold"]
        ].to_parquet(out / "predictions.parquet", index=False)
        plots(out, y, pred, feats, model.booster_.feature_importance("gain"), job.target, metrics)
        summary = {"metrics": metrics, "folds": chosen, "exported_params": final["params"], "features": feats}
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if storage.is_s3(job.out):
            storage.upload_dir(out, job.out, job.endpoint_url)
    return summary


def _outer_predictions(trials: list[dict], outer: list, x: np.ndarray, y: np.ndarray, seed: int):
    """Each outer fold predicted by a model of the parameters its inner folds chose, fitted on the
    other folds: ``(predictions, fold per row, the choice per fold)``."""
    pred = np.empty_like(y)
    fold_of = np.empty(len(y), int)
    chosen = []
    for f, (tr, te) in enumerate(outer):
        best = max(trials, key=lambda t: t[f"inner_r2_{f}"])
        chosen.append({"fold": f, "inner_r2": best[f"inner_r2_{f}"], "params": best["params"]})
        pred[te] = _model(best["params"], seed).fit(x[tr], y[tr]).predict(x[te])
        fold_of[te] = f
    return pred, fold_of, chosen


def save_artifact(dest: Path, booster, config: dict) -> None:
    import hashlib

    dest.mkdir(parents=True, exist_ok=True)
    text = booster.model_to_string()
    (dest / "model.txt").write_text(text)
    config = {**config, "version": hashlib.sha256(text.encode()).hexdigest()[:12]}
    (dest / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")


def read_config(uri: str, endpoint_url: str | None = None) -> dict:
    """A potency artifact's config (features, version, ...), its model not read."""
    config = json.loads(storage.read_bytes(storage.join(uri, "config.json"), endpoint_url))
    if config.get("kind") != "potency":
        raise ValueError(f"{uri}: a {config.get('kind')} artifact, not a potency model")
    return config


def load_potency(uri: str, endpoint_url: str | None = None):
    """A potency artifact → (LightGBM Booster from its text model, config)."""
    import lightgbm as lgb

    config = read_config(uri, endpoint_url)
    booster = lgb.Booster(model_str=storage.read_bytes(storage.join(uri, "model.txt"), endpoint_url).decode())
    return booster, config


def predict(uri: str, table, endpoint_url: str | None = None):
    """Per-image feature rows → per vessel-day predicted potency (DataFrame vessel, day, potency)."""
    booster, config = load_potency(uri, endpoint_url)
    df = table.to_pandas() if hasattr(table, "to_pandas") else table
    missing = [c for c in config["features"] if c not in df.columns]
    if missing:
        raise ValueError(f"features table: the potency model needs {', '.join(missing)}")
    agg = per_vessel_day(df, config["features"])
    agg["potency"] = booster.predict(agg[config["features"]].to_numpy(np.float64))
    return agg[["vessel", "day", "potency"]]


def plots(out: Path, y, pred, feats: list[str], importance, target: str, metrics: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.scatter(y, pred, s=14, alpha=0.7)
    lo, hi = float(min(y.min(), pred.min())), float(max(y.max(), pred.max()))
    ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    ax.set_xlabel(f"true {target}")
    ax.set_ylabel(f"predicted {target} (held-out vessels)")
    ax.set_title(
        f"R² {metrics['r2']:.2f} · Spearman ρ {metrics['spearman']:.2f} · MAE {metrics['mae']:.3g}", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(out / "predicted_vs_true.png", dpi=110)
    plt.close(fig)
    order = np.argsort(importance)[::-1][:20]
    fig, ax = plt.subplots(figsize=(6, 0.3 * len(order) + 1))
    ax.barh([feats[i] for i in order][::-1], np.asarray(importance)[order][::-1])
    ax.set_xlabel("LightGBM gain")
    fig.tight_layout()
    fig.savefig(out / "importance.png", dpi=110)
    plt.close(fig)
