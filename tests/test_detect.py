from __future__ import annotations

import json
import signal

import numpy as np
import pyarrow.compute as pc
import pytest
import torch

from msc_ray import corpus, data, detect, engine, metrics, models, synth


@pytest.fixture(scope="module")
def det_manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("det-corpus")
    synth.synthesize(root, synth.SynthConfig(n=30, size=96, stack="sstack", seed=2, abnormal_fraction=0.5))
    table, _ = corpus.index_corpus(str(root), folds=3, seed=0)
    return corpus.write_manifest(table, str(root / "manifest.parquet")), table


def _job(manifest, out, **kw):
    base = dict(
        manifest=manifest,
        out=str(out),
        folds=(0,),
        epochs=1,
        workers=2,
        cpus_per_worker=1.0,
        backbone="compact_fpn",
        size=96,
        batch_size=4,
    )
    return detect.DetectJobConfig(**{**base, **kw})


def _fold_inputs(ray_session, job, table):
    cache = data.build_cache(detect.detection_rows(table, "sstack"), job.data_config(), detection=True)
    return cache, ray_session.put(cache), engine.anchor_plan(cache.split(0, 3)[0].boxes, 2)


def test_two_workers_write_checkpoint_metrics_and_artifact(ray_session, det_manifest, tmp_path):
    manifest, table = det_manifest
    before = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        res = detect.train_detector(_job(manifest, tmp_path / "run", epochs=2))
        # Ray Train's Ctrl-C handler (abort that fit) does not outlive it: a later Ctrl-C interrupts the program
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)
    ckpts = list((tmp_path / "run" / "fold0").glob("checkpoint_*/state.pt"))
    assert ckpts
    state = torch.load(sorted(ckpts)[-1], map_location="cpu", weights_only=True)
    assert state["epoch"] == 2 and {"model", "best_model", "optimizer", "scheduler", "anchors"} <= set(state)
    md = (tmp_path / "run" / "metrics.md").read_text()
    assert "hit rate (box)" in md and "mean ± SD" in md and "inner validation" in md
    row = res["folds"][0]
    assert row["images"] == pc.sum(pc.equal(table["fold"], 0)).as_py()
    assert row["abnormal_cells"] == sum(
        len(b) for b, f in zip(table["boxes"].to_pylist(), table["fold"].to_pylist(), strict=True) if f == 0
    )
    model, cfg = models.load_detector(tmp_path / "run" / "artifact")
    assert cfg["score_threshold"] == res["operating_point"]["score_threshold"]
    assert cfg["nms_iou"] in detect.NMS_CANDIDATES and len(cfg["anchors"]["sizes"]) == 2
    with torch.no_grad():
        out = model([torch.rand(3, 96, 96)])[0]
    assert out["boxes"].shape[1] == 4 and (out["scores"] >= cfg["score_threshold"]).all()
    assert (tmp_path / "run" / "predictions.png").stat().st_size > 5000
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["folds"][0]["fold"] == 0
    # --precision auto: the training steps ran under bfloat16 autocast where this CPU does it in hardware
    assert res["bf16"] == {0: engine.cpu_has_bf16()}


def test_job_options_are_checked_with_one_line_errors():
    with pytest.raises(ValueError, match="--precision fp16: choose one of auto, bf16, fp32"):
        _job("m", "o", precision="fp16").validate()
    with pytest.raises(ValueError, match="--placement must be PACK or SPREAD"):
        _job("m", "o", placement="ANY").validate()
    _job("m", "o", precision="bf16").validate()


def test_killed_worker_resumes_from_its_checkpoint(ray_session, det_manifest, tmp_path):
    _, table = det_manifest
    job = _job("unused", tmp_path / "run", epochs=2, fail_at_epoch=1, max_failures=2)
    cache, ref, anchors = _fold_inputs(ray_session, job, table)
    ckpt, last = detect._train_fold(job, 0, 3, ref, anchors)
    assert (tmp_path / "run" / ".fault-injected-fold0").exists()  # a worker really died after epoch 1
    assert last["epoch"] == 2 and last["resumed_from"] == 1  # the new worker group started at epoch 2
    assert torch.load(f"{ckpt}/state.pt", map_location="cpu", weights_only=True)["epoch"] == 2
    more = _job("unused", tmp_path / "run", epochs=3)  # the same command with more epochs continues
    _, last = detect._train_fold(more, 0, 3, ref, anchors)
    assert last["epoch"] == 3 and last["resumed_from"] == 2


def test_images_with_no_boxes_train(ray_session, det_manifest, tmp_path):
    """Negatives only: the loss is defined (background) and training runs."""
    _, table = det_manifest
    neg = table.filter(pc.equal(pc.list_value_length(table["boxes"]), 0))
    job = _job("unused", tmp_path / "run")
    cache, ref, anchors = _fold_inputs(ray_session, job, neg)
    assert sum(len(b) for b in cache.boxes) == 0
    _, last = detect._train_fold(job, 0, 3, ref, anchors)
    assert last["epoch"] == 1 and last["boxes"] == 0 and last["images"] > 0 and np.isfinite(last["loss"])


def test_missing_or_malformed_annotations_never_train_as_negatives(corpus_copy):
    root, _ = corpus_copy
    xmls = sorted((root / "sstack" / "annotations").glob("*.xml"))
    xmls[0].unlink()
    xmls[1].write_text("<annotation><object>")
    table, _ = corpus.index_corpus(str(root), folds=3)
    rows = detect.detection_rows(table, "sstack")
    names = set(rows.column("path").to_pylist())
    assert not any(n.endswith((xmls[0].stem + ".png", xmls[1].stem + ".png")) for n in names)
    assert rows.num_rows == pc.sum(pc.equal(table["stack"], "sstack")).as_py() - 2


def test_operating_point_finds_every_cell_the_fdr_budget_allows():
    rng = np.random.default_rng(0)
    preds, truths = [], []
    for _ in range(30):
        t = rng.uniform(0, 60, 2)
        truth = np.array([[t[0], t[1], t[0] + 30, t[1] + 30]])
        false = np.array([[80, 80, 100, 100.0]])
        preds.append((np.vstack([truth + 1, false]), np.array([rng.uniform(0.6, 0.9), rng.uniform(0.1, 0.4)])))
        truths.append(truth)
    false_scores = sorted(float(s[1]) for _, s in preds)
    lowest_true = min(float(s[0]) for _, s in preds)
    strict = detect.choose_operating_point(preds, truths, max_fdr=0.0)  # no false box at all
    assert false_scores[-1] < strict["score_threshold"] <= lowest_true and strict["f1"] == pytest.approx(1.0)
    m = metrics.detection_metrics(detect._apply_nms(preds, strict["nms_iou"]), truths, strict["score_threshold"])
    assert (m["hit_rate"], m["fdr"]) == (1.0, 0.0)
    # a 5 % budget holds one false box among 31, not two: the threshold drops to the highest false score
    op = detect.choose_operating_point(preds, truths, max_fdr=0.05)
    assert op["score_threshold"] == pytest.approx(false_scores[-1]) and op["rule"].startswith("loosest")
    m = metrics.detection_metrics(detect._apply_nms(preds, op["nms_iou"]), truths, op["score_threshold"])
    assert (m["tp"], m["fp"], m["fn"]) == (30, 1, 0)
    # a model whose best box is false on every image: nothing fits the budget, best F1 is the fallback
    worse = [(b, np.array([s[1], s[0]])) for b, s in preds]
    op = detect.choose_operating_point(worse, truths, max_fdr=0.05)
    assert op["rule"].startswith("best F1") and op["f1"] == pytest.approx(2 * 30 / (2 * 30 + 30))


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


def test_unreadable_images_cannot_stall_two_ddp_workers(ray_session, tmp_path):
    """Several training images of the fold cannot be decoded (a whole batch's worth): they are left
    out once, when the cache is built, before the epoch is cut into equal per-rank slices, so both
    workers take the same number of steps and every collective is joined; the run ends normally."""
    root = tmp_path / "c"
    synth.synthesize(root, synth.SynthConfig(n=30, size=96, stack="sstack", seed=4, abnormal_fraction=0.5))
    table, _ = corpus.index_corpus(str(root), folds=3, seed=0)
    train_paths = [p for p, f in zip(table["path"].to_pylist(), table["fold"].to_pylist(), strict=True) if f == 2]
    broken = sorted(train_paths)[:5]
    for p in broken:
        (root / p).write_bytes(b"\x89PNG\r\n\x1a\n broken upload")
    manifest = corpus.write_manifest(table, str(root / "manifest.parquet"))
    res = detect.train_detector(_job(manifest, tmp_path / "run", epochs=2, min_epochs=2))
    assert len(res["left_out"]) == 5 and all(any(b in e for b in broken) for e in res["left_out"])
    last = sorted((tmp_path / "run" / "fold0").glob("checkpoint_*/state.pt"))[-1]
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["epoch"] == 2
