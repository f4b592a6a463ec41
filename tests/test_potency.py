from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from msc_ray import potency


def known_formula(tmp_path, vessels=24, days=4, images=3, noise=0.05, seed=0):
    """Per-image morphology rows whose vessel-day potency follows a known formula of two features
    (the others are noise)."""
    rng = np.random.default_rng(seed)
    rows = []
    for v in range(vessels):
        bias = rng.normal(0, 1, 4)  # a vessel's biology
        for d in range(1, days + 1):
            spindle = bias[0] + 0.2 * d
            flat = bias[1] - 0.1 * d
            pot = 2.0 * spindle - 1.5 * flat + 0.3 * spindle * flat + rng.normal(0, noise)
            for i in range(images):
                rows.append(
                    {
                        "image": f"V{v}_d{d}_{i}.png",
                        "vessel": f"V{v:02d}",
                        "day": d,
                        "aspect_ratio_median": spindle + rng.normal(0, 0.1),
                        "flattened_share": flat + rng.normal(0, 0.1),
                        "area_iqr": rng.normal(0, 1),
                        "solidity_median": rng.normal(0, 1),
                        "confluence": rng.uniform(0.1, 0.9),  # a metadata column, never an input
                        "potency": pot,
                    }
                )
    path = tmp_path / "features.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path, pd.DataFrame(rows)


def test_potency_model_recovers_a_known_formula_on_held_out_vessels(ray_session, tmp_path):
    path, df = known_formula(tmp_path)
    job = potency.PotencyJobConfig(features=str(path), out=str(tmp_path / "run"), folds=4, samples=4)
    summary = potency.train_potency(job)
    m = summary["metrics"]
    assert m["vessel_days"] == 24 * 4 and m["vessels"] == 24
    assert m["r2"] > 0.7 and m["spearman"] > 0.8, m  # a model that learned nothing has R² ≤ 0
    run = tmp_path / "run"
    pred = pd.read_parquet(run / "predictions.parquet")
    assert len(pred) == 96 and set(pred["fold"]) == {0, 1, 2, 3}
    # every vessel is predicted by a model that never saw it: one fold per vessel
    assert pred.groupby("vessel")["fold"].nunique().max() == 1
    assert (run / "importance.png").stat().st_size > 0 and (run / "predicted_vs_true.png").stat().st_size > 0
    cfg = json.loads((run / "artifact" / "config.json").read_text())
    assert cfg["kind"] == "potency" and set(cfg["features"]) == {
        "flattened_share",
        "aspect_ratio_median",
        "solidity_median",
        "area_iqr",
    }  # the morphology columns only: not the target, the day or other metadata
    assert (run / "artifact" / "model.txt").read_text().startswith("tree")  # LightGBM's own text format
    # the artifact predicts per vessel-day from per-image rows
    out = potency.predict(str(run / "artifact"), df)
    truth = df.groupby(["vessel", "day"], as_index=False)["potency"].mean()
    merged = out.merge(truth, on=["vessel", "day"], suffixes=("_pred", ""))
    assert np.corrcoef(merged["potency_pred"], merged["potency"])[0, 1] > 0.95  # fitted on these vessels


def test_bad_feature_tables_are_one_line_errors(tmp_path):
    pq.write_table(pa.table({"vessel": ["a"], "day": [1], "x": [1.0]}), tmp_path / "f.parquet")
    job = potency.PotencyJobConfig(features=str(tmp_path / "f.parquet"), out=str(tmp_path / "o"))
    with pytest.raises(ValueError, match="no column potency"):
        potency.train_potency(job)
    pq.write_table(
        pa.table({"vessel": ["a", "b"], "day": [1, 1], "x": [1.0, 2.0], "potency": [1.0, 2.0]}), tmp_path / "g.parquet"
    )
    with pytest.raises(ValueError, match="nope.parquet: no such features table"):
        potency.train_potency(potency.PotencyJobConfig(features=str(tmp_path / "nope.parquet"), out=str(tmp_path)))
    with pytest.raises(ValueError, match="2 vessels, fewer than --folds 5"):
        potency.train_potency(potency.PotencyJobConfig(features=str(tmp_path / "g.parquet"), out=str(tmp_path / "o")))
