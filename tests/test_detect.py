from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.compute as pc
import pytest
import torch

from msc_ray import corpus, detect, metrics, models, synth


@pytest.fixture(scope="module")
def det_manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("det-corpus")
    synth.synthesize(root, synth.SynthConfig(n=20, size=96, stack="sstack", seed=2, abnormal_fraction=0.5))
    table, _ = corpus.index_corpus(str(root), folds=2, seed=0)
    return corpus.write_manifest(table, str(root / "manifest.parquet")), table


def _job(manifest, out, **kw):
    base = dict(
        manifest=manifest,
        out=str(out),
        folds=(0,),
        epochs=1,
        workers=2,
        cpus_per_worker=0.5,
        backbone="resnet18_fpn",
        size=96,
        batch_size=4,
    )
    return detect.DetectJobConfig(**{**base, **kw})


def test_two_workers_write_checkpoint_metrics_and_artifact(ray_session, det_manifest, tmp_path):
    manifest, table = det_manifest
    train = table.filter(pc.not_equal(table["fold"], 0))
    n_boxes = pc.list_value_length(train["boxes"]).to_pylist()
    assert 0 in n_boxes and max(n_boxes) > 0  # negatives (no abnormal cell) are in the training data
    res = detect.train_detector(_job(manifest, tmp_path / "run"))
    ckpts = list((tmp_path / "run" / "fold0").glob("checkpoint_*/state.pt"))
    assert ckpts
    state = torch.load(ckpts[0], map_location="cpu", weights_only=True)
    assert state["epoch"] == 1 and {"model", "optimizer", "scheduler", "config"} <= set(state)
    md = (tmp_path / "run" / "metrics.md").read_text()
    assert "hit rate (box)" in md and "mean ± SD" in md and "Operating point" in md
    row = res["folds"][0]
    assert row["images"] == pc.sum(pc.equal(table["fold"], 0)).as_py()
    assert 0 <= row["hit_rate"] <= 1 and 0 <= row["fdr"] <= 1
    model, cfg = models.load_detector(tmp_path / "run" / "artifact")
    assert cfg["score_threshold"] == res["operating_point"]["score_threshold"]
    assert cfg["nms_iou"] in detect.NMS_CANDIDATES
    with torch.no_grad():
        out = model([torch.rand(3, 96, 96)])[0]
    assert out["boxes"].shape[1] == 4 and (out["scores"] >= cfg["score_threshold"]).all()
    assert (tmp_path / "run" / "predictions.png").stat().st_size > 5000
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["folds"][0]["fold"] == 0


def test_killed_worker_resumes_from_its_checkpoint(ray_session, det_manifest, tmp_path):
    manifest, _ = det_manifest
    job = _job(manifest, tmp_path / "run", epochs=2, fail_at_epoch=1, max_failures=2)
    ckpt, last = detect._train_fold(job, 0)
    assert (tmp_path / "run" / ".fault-injected-fold0").exists()  # a worker really died after epoch 1
    assert last["epoch"] == 2 and last["resumed_from"] == 1  # the new worker group started at epoch 2
    assert torch.load(f"{ckpt}/state.pt", map_location="cpu", weights_only=True)["epoch"] == 2
    # rerunning the same command with more epochs continues from the latest checkpoint
    more = _job(manifest, tmp_path / "run", epochs=3)
    _, last = detect._train_fold(more, 0)
    assert last["epoch"] == 3 and last["resumed_from"] == 2


def test_images_with_no_boxes_train(ray_session, det_manifest, tmp_path):
    """A training set of negatives only: the loss is defined (classification of background) and
    training runs; the detector learns to say none."""
    _, table = det_manifest
    neg = table.filter(pc.equal(pc.list_value_length(table["boxes"]), 0))
    root = tmp_path / "neg"
    manifest = corpus.write_manifest(neg.replace_schema_metadata(table.schema.metadata), str(root / "m.parquet"))
    _, last = detect._train_fold(_job(manifest, tmp_path / "run"), 0)
    assert last["epoch"] == 1 and last["boxes"] == 0 and last["images"] > 0 and np.isfinite(last["loss"])
    shutil.rmtree(root)


def test_detection_metrics_definitions():
    truth = [np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float), np.zeros((0, 4)), np.array([[5, 5, 9, 9]], float)]
    preds = [
        (np.array([[0, 0, 10, 10], [50, 50, 60, 60]], float), np.array([0.9, 0.8])),
        (np.array([[1, 1, 4, 4]], float), np.array([0.7])),
        (np.zeros((0, 4)), np.zeros(0)),
    ]
    m = metrics.detection_metrics(preds, truth, 0.5)
    assert (m["tp"], m["fp"], m["fn"]) == (1, 2, 2)
    assert m["hit_rate"] == pytest.approx(1 / 3) and m["fdr"] == pytest.approx(2 / 3)
    assert m["image_hit_rate"] == pytest.approx(1 / 2) and m["image_fdr"] == pytest.approx(1 / 2)
    assert metrics.average_precision(preds, truth) == pytest.approx(1 / 3)
