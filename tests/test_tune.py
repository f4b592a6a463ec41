from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
import torch

from msc_ray import corpus, data, models, synth
from msc_ray import tune as mt
from msc_ray.config import DataConfig, from_dict


@pytest.fixture(scope="module")
def sstack_manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune-corpus")
    synth.synthesize(root, synth.SynthConfig(n=30, size=64, stack="sstack", seed=5))
    table, _ = corpus.index_corpus(str(root), folds=2, seed=0)
    return corpus.write_manifest(table, str(root / "manifest.parquet")), table


@pytest.fixture(scope="module")
def tiny_search(ray_session, sstack_manifest, tmp_path_factory):
    manifest, _ = sstack_manifest
    out = tmp_path_factory.mktemp("run")
    job = mt.TuneJobConfig(
        manifest=manifest,
        out=str(out),
        stack="sstack",
        backbones=("resnet18", "mobilenet_v3_small"),
        max_epochs=2,
        patience=2,
        samples=1,
        size=64,
        batch_size=16,
        pretrained="none",
    )
    return job, mt.run_search(job)


def test_tiny_search_writes_table_plots_and_a_working_artifact(tiny_search, sstack_manifest):
    job, outcome = tiny_search
    out = Path(job.out)
    assert {t.backbone for t in outcome.search} == {"resnet18", "mobilenet_v3_small"}
    assert {(t.backbone, t.fold) for t in outcome.search} == {(b, f) for b in job.backbones for f in (0, 1)}
    table = (out / "table.md").read_text()
    assert "resnet18" in table and "mobilenet_v3_small" in table and "±" in table
    assert (out / "table.csv").read_text().count("\n") == len(outcome.table) + 1
    assert (out / "winner.png").stat().st_size > 10_000
    winner_rows = [r for r in outcome.table if r["run"].startswith("winner")]
    assert (
        len(winner_rows) == 1 and winner_rows[0]["folds_complete"] == "2/2" and winner_rows[0]["status"] == "complete"
    )
    # rows of backbones ASHA cut short say so and are not averaged as if complete
    for r in outcome.table:
        if r["status"] != "complete":
            assert "ASHA" in r["status"] and r["folds_complete"] != "2/2"
    summary = json.loads((out / "summary.json").read_text())
    cal = summary["calibration"]
    assert cal["temperature"] > 0 and 0 <= cal["ece_after"] <= 1 and 0 <= cal["ece_before"] <= 1

    model, cfg = models.load_classifier(out / "artifact")
    assert cfg["architecture"] == outcome.winner["backbone"] and cfg["classes"] == ["1", "2", "3", "4"]
    assert cfg["trained_on"] == "all images" and cfg["temperature"] == pytest.approx(cal["temperature"])
    dcfg = from_dict(DataConfig, cfg["data"])
    _, table = sstack_manifest
    rows = data.select(table, stack="sstack")
    x, _, _ = next(data.torch_batches(data.make_dataset(rows, dcfg, train=False), 4))
    with torch.no_grad():
        probs = torch.softmax(model(x) / cfg["temperature"], 1)
    assert probs.shape == (4, 4) and torch.allclose(probs.sum(1), torch.ones(4))


def test_fold_groups_never_leak(tiny_search, sstack_manifest):
    _, outcome = tiny_search
    _, table = sstack_manifest
    groups = table.column("group").to_pylist()
    folds = table.column("fold").to_pylist()
    for t in outcome.final:
        with np.load(os.path.join(t.checkpoint, "val.npz"), allow_pickle=False) as z:
            val_rows = z["rows"].tolist()
        assert val_rows and all(folds[r] == t.fold for r in val_rows)
        train_rows = data.select(table, stack="sstack", fold=t.fold, train=True)["row"].to_pylist()
        assert {groups[r] for r in val_rows}.isdisjoint({groups[r] for r in train_rows})


def test_two_class_corpus(ray_session, small_corpus, tmp_path):
    src, rows = small_corpus
    root = tmp_path / "two"
    for r in rows:
        if r["stack"] != "sstack":
            continue
        name = "sparse" if r["class"] <= 2 else "dense"
        dst = root / "sstack" / name / Path(r["image"]).name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / r["image"], dst)
    table, _ = corpus.index_corpus(str(root), folds=2)
    assert corpus.manifest_info(table)["classes"]["sstack"] == ["dense", "sparse"]
    manifest = corpus.write_manifest(table, str(root / "manifest.parquet"))
    job = mt.TuneJobConfig(
        manifest=manifest,
        out=str(tmp_path / "run"),
        backbones=("mobilenet_v3_small",),
        max_epochs=1,
        samples=1,
        size=64,
        batch_size=16,
        asha=False,
        pretrained="none",
    )
    outcome = mt.run_search(job)
    model, cfg = models.load_classifier(tmp_path / "run" / "artifact")
    assert cfg["classes"] == ["dense", "sparse"]
    with torch.no_grad():
        assert model(torch.rand(1, 3, 64, 64)).shape == (1, 2)
    assert outcome.table[-1]["folds_complete"] == "2/2"


def _finished_trials(exp: Path) -> dict[str, int]:
    done = {}
    for res in exp.glob("*/result.json"):
        lines = [json.loads(x) for x in res.read_text().splitlines() if x.strip()]
        if lines and lines[-1].get("done_reason"):
            done[res.parent.name] = len(lines)
    return done


def test_interrupted_search_resumes(sstack_manifest, tmp_path):
    manifest, _ = sstack_manifest
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "msc_ray.cli",
        "tune",
        manifest,
        "--out",
        str(out),
        "--backbones",
        "mobilenet_v3_small",
        "--samples",
        "2",
        "--max-epochs",
        "2",
        "--size",
        "64",
        "--batch-size",
        "16",
        "--no-asha",
        "--pretrained",
        "none",
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + 300
    while not _finished_trials(out / "search") and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
    before = _finished_trials(out / "search")
    assert before, "no trial finished before the deadline"
    proc.send_signal(signal.SIGINT)  # as Ctrl-C would
    text = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0
    assert not (out / "artifact").exists()
    assert len(before) < 4 or "--resume" in text
    again = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    after = _finished_trials(out / "search")
    assert len(after) == 4
    for trial, n_results in before.items():  # finished trials were not trained again
        assert after[trial] == n_results
    assert (out / "artifact" / "weights.pt").exists() and "winner:" in again.stdout
    mf = corpus.read_manifest(manifest)
    assert pc.sum(pc.equal(mf["stack"], "sstack")).as_py() == 30
