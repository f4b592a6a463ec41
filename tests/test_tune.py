from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from msc_ray import corpus, data, engine, inference, metrics, models, synth
from msc_ray import tune as mt
from msc_ray.config import DataConfig, from_dict


@pytest.fixture(scope="module")
def sstack_manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune-corpus")
    synth.synthesize(root, synth.SynthConfig(n=45, size=64, stack="sstack", seed=5))
    table, _ = corpus.index_corpus(str(root), folds=3, seed=0)
    return corpus.write_manifest(table, str(root / "manifest.parquet")), table


@pytest.fixture(scope="module")
def tune_warnings():
    """Warnings Ray Tune logs in this process while the module's searches run."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler, logger = Keep(logging.WARNING), logging.getLogger("ray.tune")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def _tiny_job(manifest: str, out, **over) -> mt.TuneJobConfig:
    """Two-epoch single-stack search at 64 px, one fixed learning rate, random weights."""
    base = dict(stack="sstack", max_epochs=2, patience=2, samples=1, lr_min=2e-3, lr_max=2e-3, size=64)
    base.update(batch_size=16, pretrained="none", verbose=0)
    return mt.TuneJobConfig(manifest=manifest, out=str(out), **{**base, **over})


@pytest.fixture(scope="module")
def tiny_search(ray_session, sstack_manifest, tmp_path_factory, tune_warnings):
    manifest, _ = sstack_manifest
    job = _tiny_job(manifest, tmp_path_factory.mktemp("run"), backbones=("compact_cnn", "coverage_unet"))
    return job, mt.run_search(job)


def test_tiny_search_writes_table_plots_and_a_working_artifact(tiny_search, sstack_manifest):
    job, outcome = tiny_search
    out = Path(job.out)
    assert {(t.backbone, t.fold) for t in outcome.search} == {(b, f) for b in job.backbones for f in (0, 1, 2)}
    table = (out / "table.md").read_text()
    assert "compact_cnn" in table and "coverage_unet" in table and "outer folds" in table
    winner_rows = [r for r in outcome.table if r["run"].startswith("winner")]
    assert len(winner_rows) == 1 and winner_rows[0]["folds_complete"] == "3/3"
    # a search with a choice: the export run (fold -1) is a trial of the final experiment, started
    # first, not an experiment of its own after it; Table 1 and the final folds leave it out
    assert sorted(t.fold for t in outcome.final) == [0, 1, 2]
    final_trials = [p.name for p in (out / "final").iterdir() if p.is_dir() and "-fold" in p.name]
    assert any("-fold-1-" in name for name in final_trials) and not (out / "export").exists(), final_trials
    # the winner's outer-fold figures are the mean of its fold trials' outer figures
    assert winner_rows[0]["acc_mean"] == pytest.approx(np.mean([t.test_acc for t in outcome.final]))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["calibration"]["fitted_on"] == "inner validation folds"
    # ECE read against what a calibrated model would show on the same number of images
    assert "ECE floor" in table and 0 < winner_rows[0]["ece_floor_mean"] < 1
    assert 0 < summary["calibration"]["ece_floor"] < 1
    assert len(summary["outer_folds"]["per_class"]) == 4

    model, cfg = models.load_classifier(out / "artifact")
    assert cfg["architecture"] == outcome.winner["backbone"] and cfg["classes"] == ["1", "2", "3", "4"]
    assert cfg["confluence_output"] is True  # the synthetic corpus carries measured confluence
    # the synthetic corpus has cell masks: both backbones train a coverage map from them; the compact CNN's
    # only shapes its features and the exported model leaves it out, the coverage U-Net's is its output
    assert cfg["coverage_supervision"] is True
    kept = [k for k in models.read_artifact(out / "artifact")[1] if k.startswith("coverage.")]
    assert bool(kept) is (cfg["architecture"] == "coverage_unet")
    for t in outcome.final:
        saved = torch.load(os.path.join(t.checkpoint, "state.pt"), map_location="cpu", weights_only=True)
        assert saved["coverage_supervision"] is True
        assert any(k.startswith("coverage.") for k in saved["model"])
    dcfg = from_dict(DataConfig, cfg["data"])
    _, mf = sstack_manifest
    x, _, _ = next(data.torch_batches(data.make_dataset(data.select(mf, stack="sstack"), dcfg, train=False), 4))
    with torch.no_grad():
        assert model(x).shape == (4, 5)  # four band logits and the confluence output
    # the scoring side averages the views the temperature was fitted with: the model's outputs over the
    # eight turned and mirrored images, not the image as it is
    assert cfg["views"] == job.views == 8
    clf = inference.Classifier(str(out / "artifact"), device=torch.device("cpu"))
    probs, conf = clf(x.numpy())
    with torch.no_grad():
        mean = torch.stack([model(engine.dihedral_view(x, i)) for i in range(8)]).mean(0)
        one = model(x)
    assert np.allclose(probs, torch.softmax(mean[:, :4] / cfg["temperature"], 1).numpy(), atol=1e-5)
    # after two epochs the outputs move little with the view (about 1e-4) and the temperature flattens
    # the band probabilities further: the confluence output (no temperature) tells the views apart
    assert np.allclose(conf, torch.sigmoid(mean[:, 4]).numpy(), atol=1e-6)
    assert not np.allclose(conf, torch.sigmoid(one[:, 4]).numpy(), atol=1e-6)


def test_a_coverage_unet_search_exports_the_map_its_bands_and_confluence_come_from(
    ray_session, sstack_manifest, tmp_path
):
    """coverage_unet has no head of its own: its pixel map is the model, so the artifact keeps the map the
    export run trained (the compact CNN's is left out), and the loaded model reads confluence as the map's
    mean probability, as scoring does."""
    manifest, table = sstack_manifest
    job = _tiny_job(manifest, tmp_path / "run", backbones=("coverage_unet",), views=1, wd_min=1e-5, wd_max=1e-5)
    outcome = mt.run_search(job)
    assert outcome.winner["backbone"] == "coverage_unet"
    model, cfg = models.load_classifier(tmp_path / "run" / "artifact")
    assert cfg["coverage_supervision"] is True and cfg["confluence_output"] is True
    state = models.read_artifact(tmp_path / "run" / "artifact")[1]
    # one backbone and one learning rate: the export run (fold -1) trained in the search's experiment
    export = list((tmp_path / "run" / "search").glob("coverage_unet-fold-1-*/checkpoint_*/state.pt"))
    assert len(export) == 1 and not (tmp_path / "run" / "export").exists(), export
    saved = torch.load(export[0], map_location="cpu", weights_only=True)["best_model"]
    assert torch.equal(state["coverage.weight"], saved["coverage.weight"].to(state["coverage.weight"].dtype))
    x, _, _ = next(
        data.torch_batches(
            data.make_dataset(data.select(table, stack="sstack"), from_dict(DataConfig, cfg["data"]), train=False), 6
        )
    )
    with torch.no_grad():
        out, cov = model.forward_with_coverage(x)
    assert torch.allclose(torch.sigmoid(out[:, 4]), torch.sigmoid(cov).mean((1, 2, 3)), atol=1e-5)
    # scoring (one view, as the artifact says) reads the same covered fraction
    probs, conf = inference.Classifier(str(tmp_path / "run" / "artifact"), device=torch.device("cpu"))(x.numpy())
    assert np.allclose(conf, torch.sigmoid(cov).mean((1, 2, 3)).numpy(), atol=1e-5)
    assert np.allclose(probs.sum(1), 1.0, atol=1e-5)


def test_a_search_with_one_configuration_trains_its_export_beside_the_fold_trials(
    ray_session, sstack_manifest, tmp_path
):
    """One backbone, one learning rate and weight decay: the winner is known before any trial runs, so the
    export run is one more trial of the search's experiment instead of an experiment alone after it, and
    it trains exactly the model a separate export run trains."""
    manifest, table = sstack_manifest
    job = _tiny_job(manifest, tmp_path / "run", backbones=("compact_cnn",), views=1, wd_min=1e-5, wd_max=1e-5)
    assert mt.known_winner(job) == {"backbone": "compact_cnn", "lr": 2e-3, "weight_decay": 1e-5}
    assert mt.known_winner(dataclasses.replace(job, wd_max=1e-3)) is None  # the tiny job's default: sampled
    assert mt.known_winner(dataclasses.replace(job, backbones=("compact_cnn", "coverage_unet"))) is None
    assert mt.known_winner(dataclasses.replace(job, lr_max=3e-3)) is None
    outcome = mt.run_search(job)
    assert sorted(t.fold for t in outcome.search) == [0, 1, 2] and outcome.winner["backbone"] == "compact_cnn"
    assert [t.fold for t in outcome.final] == [0, 1, 2]  # the search's own fold trials, not trained again
    trials = sorted(
        p.name.split("-fold")[1].rsplit("-", 1)[0] for p in (tmp_path / "run" / "search").iterdir() if p.is_dir()
    )
    assert trials == ["-1", "0", "1", "2"] and not (tmp_path / "run" / "export").exists()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["epochs_run"] == {"search": 3 * job.max_epochs, "final": 3 * job.max_epochs}

    alone = dataclasses.replace(job, out=str(tmp_path / "alone"))
    caches = mt.build_caches(mt.absolute(alone), corpus.read_manifest(manifest))
    export = mt.export_phase(alone, 3, ["1", "2", "3", "4"], caches, outcome.winner, job.max_epochs, resume=False)
    assert (tmp_path / "alone" / "export").is_dir()
    separate = torch.load(Path(export.checkpoint) / "state.pt", map_location="cpu", weights_only=True)["best_model"]
    exported = models.read_artifact(tmp_path / "run" / "artifact")[1]
    assert exported and all(torch.equal(v, separate[k].to(v.dtype)) for k, v in exported.items())


def test_a_trial_faster_than_the_checkpoint_interval_checkpoints_once_when_it_ends(tiny_search):
    """2-epoch trials of a few seconds (``checkpoint_every_s`` 30): one checkpoint each, with the last
    report; checkpointing after every epoch would have left each trial's second one."""
    job, outcome = tiny_search
    assert job.checkpoint_every_s == 30
    for t in outcome.final:
        assert t.epochs_run == 2 and t.checkpoint and Path(t.checkpoint).name == "checkpoint_000000", t


def test_a_search_does_not_warn_that_snapshots_after_trial_checkpoints_are_a_bottleneck(tiny_search, tune_warnings):
    """One checkpoint kept per trial forces an experiment snapshot after each trial checkpoint; trials
    ending together made Tune warn six times in this search (``tune.SNAPSHOT_WARNING``)."""
    assert len(tiny_search[1].search) == 6
    assert not [r for r in tune_warnings if "snapshotting has been triggered" in r.getMessage()]


def test_outer_folds_are_never_trained_on(tiny_search, sstack_manifest):
    _, outcome = tiny_search
    _, table = sstack_manifest
    folds = table.column("fold").to_numpy()
    for t in outcome.final:
        with np.load(os.path.join(t.checkpoint, "outputs.npz"), allow_pickle=False) as z:
            rows = z["test_rows"]
        assert len(rows) and set(folds[rows]) == {t.fold}


def test_table_1_pools_the_outer_folds_each_calibrated_with_its_own_fold_temperature(tiny_search, sstack_manifest):
    job, outcome = tiny_search
    _, table = sstack_manifest
    probs, labels = [], []
    for t in outcome.final:
        with np.load(os.path.join(t.checkpoint, "outputs.npz"), allow_pickle=False) as z:
            # the fold's temperature is the one its own inner validation part fits, whatever the pooled one is
            own = metrics.fit_temperature(z["val_outputs"][:, :4], z["val_labels"])
            assert np.allclose(z["test_temperature"], own) and len(z["test_temperature"]) == len(z["test_labels"])
            probs.append(metrics.calibrated(z["test_outputs"][:, :4], own))
            labels.append(z["test_labels"])
    probs, labels = np.concatenate(probs), np.concatenate(labels)
    pooled = json.loads((Path(job.out) / "summary.json").read_text())["outer_folds"]
    assert pooled["images"] == len(labels) == table.num_rows  # every image once, on the fold that held it out
    assert pooled["held_out_ece"] == pytest.approx(metrics.expected_calibration_error(labels, probs))
    assert pooled["held_out_ece_floor"] == pytest.approx(metrics.ece_floor(probs))
    md = (Path(job.out) / "table.md").read_text()
    assert f"pooled ({len(labels)} images" in md and f"ECE {pooled['held_out_ece']:.3f}" in md


def test_pooled_held_out_ece_uses_each_fold_temperature_not_a_shared_one():
    from msc_ray.tune.run import pooled_outer_figures

    rng = np.random.default_rng(0)
    # labels drawn from softmax(base): base is calibrated at temperature 1. Fold A's logits are four times too
    # sharp (its temperature 4 gives base back), fold B's are base itself (1)
    base = 2 * rng.normal(size=(400, 4))
    labels = (rng.random((400, 1)) > np.cumsum(metrics.calibrated(base), 1)).sum(1).clip(max=3)
    logits = np.concatenate([4 * base[:200], base[200:]])
    temps = np.concatenate([np.full(200, 4.0), np.full(200, 1.0)])
    outs = {"test_outputs": logits, "test_labels": labels, "test_temperature": temps}
    own = np.concatenate([metrics.calibrated(logits[:200], 4.0), metrics.calibrated(logits[200:], 1.0)])
    shared = pooled_outer_figures(outs, ["1", "2", "3", "4"], temperature=1.0)
    assert shared["held_out_ece"] == pytest.approx(metrics.expected_calibration_error(labels, own))
    # one temperature for both folds leaves fold A overconfident; each fold's own does not
    assert metrics.expected_calibration_error(labels, metrics.calibrated(logits, 1.0)) > shared["held_out_ece"] + 0.05
    # figures saved before the folds' temperatures were kept: no pooled held-out ECE rather than a wrong one
    del outs["test_temperature"]
    assert "held_out_ece" not in pooled_outer_figures(outs, ["1", "2", "3", "4"], temperature=1.0)


def test_cross_fitted_temperatures_come_from_the_other_folds_only():
    rng = np.random.default_rng(1)
    base = 2 * rng.normal(size=(900, 4))
    labels = (rng.random((900, 1)) > np.cumsum(metrics.calibrated(base), 1)).sum(1).clip(max=3)
    # every fold's logits three times too sharp: each cross-fitted temperature finds about 3
    parts = {f: {"test_outputs": 3 * base[f::3], "test_labels": labels[f::3]} for f in range(3)}
    temps = mt.fold_temperatures(parts, 4)
    assert all(2.5 < t < 3.6 for t in temps.values()), temps
    for f in range(3):
        others = [parts[g] for g in range(3) if g != f]
        fitted = metrics.fit_temperature(
            np.concatenate([p["test_outputs"] for p in others]), np.concatenate([p["test_labels"] for p in others])
        )
        assert temps[f] == pytest.approx(fitted)
    # a fold's own outputs never enter its temperature: made ten times sharper, fold 0 moves the other two
    sharper = {**parts, 0: {**parts[0], "test_outputs": 30 * base[0::3]}}
    moved = mt.fold_temperatures(sharper, 4)
    assert moved[0] == pytest.approx(temps[0]) and moved[1] > temps[1] + 1 and moved[2] > temps[2] + 1
    with pytest.raises(ValueError, match="at least two outer folds"):
        mt.fold_temperatures({0: parts[0]}, 4)


def test_a_cross_fitted_search_trains_each_fold_on_every_other_fold(ray_session, sstack_manifest, tmp_path):
    """--inner-fold train: each fold's model trains on every fold but its outer one for its whole schedule;
    Table 1 calibrates fold k with the temperature the other folds' outer outputs fit, the export with the
    one all the outer outputs fit."""
    manifest, table = sstack_manifest
    job = _tiny_job(
        manifest, tmp_path / "run", backbones=("compact_cnn",), views=1, wd_min=1e-5, wd_max=1e-5, inner_fold="train"
    )
    outcome = mt.run_search(job)
    folds = table.column("fold").to_numpy()
    parts = {}
    for t in outcome.final:
        assert t.done_reason == "epochs" and t.epochs_run == job.max_epochs and np.isnan(t.best_val_auc)
        last = json.loads((Path(t.checkpoint).parent / "result.json").read_text().splitlines()[-1])
        assert last["train_images"] == int((folds != t.fold).sum())  # the inner fold trained too
        with np.load(os.path.join(t.checkpoint, "outputs.npz"), allow_pickle=False) as z:
            parts[t.fold] = {k: z[k] for k in z.files}
        assert set(folds[parts[t.fold]["test_rows"]]) == {t.fold} and "val_outputs" not in parts[t.fold]
    summary = json.loads((Path(job.out) / "summary.json").read_text())
    assert summary["winner"] == {"backbone": "compact_cnn", "lr": 2e-3, "weight_decay": 1e-5, "mean_search_auc": None}
    probs, labels = [], []
    for t in outcome.final:
        others = [parts[f] for f in parts if f != t.fold]
        temp = metrics.fit_temperature(
            np.concatenate([p["test_outputs"][:, :4] for p in others]),
            np.concatenate([p["test_labels"] for p in others]),
        )
        own = metrics.calibrated(parts[t.fold]["test_outputs"][:, :4], temp)
        assert t.test_ece_after == pytest.approx(metrics.expected_calibration_error(parts[t.fold]["test_labels"], own))
        assert t.test_acc == pytest.approx(np.mean(own.argmax(1) == parts[t.fold]["test_labels"]))
        probs.append(own)
        labels.append(parts[t.fold]["test_labels"])
    probs, labels = np.concatenate(probs), np.concatenate(labels)
    assert summary["outer_folds"]["held_out_ece"] == pytest.approx(metrics.expected_calibration_error(labels, probs))
    assert summary["calibration"]["ece_after"] == pytest.approx(summary["outer_folds"]["held_out_ece"])
    pooled = np.concatenate([parts[f]["test_outputs"][:, :4] for f in sorted(parts)])
    pooled_labels = np.concatenate([parts[f]["test_labels"] for f in sorted(parts)])
    assert summary["calibration"]["temperature"] == pytest.approx(metrics.fit_temperature(pooled, pooled_labels))
    assert models.read_config(Path(job.out) / "artifact")["temperature"] == summary["calibration"]["temperature"]
    rows = {r["run"].split(",")[0]: r for r in outcome.table}
    assert all(r["folds_complete"] == "3/3" and r["status"] == "complete" for r in outcome.table)
    assert set(rows) == {"search: one trial per fold", "winner"}
    assert rows["winner"]["ece_after_mean"] == pytest.approx(np.mean([t.test_ece_after for t in outcome.final]))
    assert "cross-fitted calibration" in (Path(job.out) / "table.md").read_text()


def test_winner_and_table_use_inner_validation_and_mark_cut_backbones():
    t = mt.TrialResult
    search = [
        t("a", 0, 1e-3, 0.0, 4, "patience", best_val_auc=0.9, test_acc=0.5),
        t("a", 1, 1e-3, 0.0, 4, "patience", best_val_auc=0.8, test_acc=0.7),
        t("b", 0, 1e-3, 0.0, 4, "patience", best_val_auc=0.6, test_acc=0.99),  # best outer, worse inner
        t("b", 1, 1e-3, 0.0, 1, "", best_val_auc=0.5),  # cut by ASHA
    ]
    w = mt.pick_winner(search, 2)
    assert w["backbone"] == "a"
    rows = {r["backbone"]: r for r in mt.build_table(search, [], 2, w)}
    assert rows["a"]["acc_mean"] == pytest.approx(0.6) and rows["a"]["status"] == "complete"
    assert "cut" in rows["b"]["status"] and np.isnan(rows["b"]["acc_mean"])  # no flattering partial mean
    assert rows["b"]["folds_complete"] == "1/2"


def _falling_run(sstack_manifest, tmp_path, monkeypatch, *, min_epochs: int, patience: int) -> mt.ClassifierRun:
    """A six-epoch compact-CNN trial of outer fold 0 whose inner-validation ROC-AUC falls every epoch
    (0.9, 0.8, ...; then 0.0, also for the outer fold)."""
    manifest, table = sstack_manifest
    job = mt.TuneJobConfig(
        manifest=manifest,
        out=str(tmp_path),
        backbones=("compact_cnn",),
        max_epochs=6,
        min_epochs=min_epochs,
        patience=patience,
        size=64,
        batch_size=16,
        pretrained="none",
    )
    caches = mt.build_caches(job, table)
    falling = itertools.chain([0.9, 0.8, 0.7, 0.6, 0.5, 0.4], itertools.repeat(0.0))
    evaluate = engine.evaluate

    def falling_auc(out, part, classes, *args):
        return {**evaluate(out, part, classes, *args), "roc_auc": next(falling)}

    monkeypatch.setattr(engine, "evaluate", falling_auc)
    config = {
        "job": dataclasses.asdict(job),
        "phase": "search",
        "backbone": "compact_cnn",
        "fold": 0,
        "folds": 3,
        "classes": corpus.manifest_info(table)["classes"]["sstack"],
        "lr": 2e-3,
        "weight_decay": 1e-5,
    }
    return mt.ClassifierRun(config, caches)


def test_no_best_epoch_nor_early_stop_before_min_epochs(ray_session, sstack_manifest, tmp_path, monkeypatch):
    """Mid-schedule inner-validation figures swing: a trial keeps no best epoch and cannot stop before
    min_epochs. With a falling validation ROC-AUC and patience 1, it would otherwise stop at epoch 2
    with epoch 1's weights."""
    run = _falling_run(sstack_manifest, tmp_path, monkeypatch, min_epochs=4, patience=1)
    reasons = [run.run_epoch(e)[2] for e in range(4)]
    assert reasons == ["", "", "", ""]
    assert run.stopper.best_epoch == 4 and run.stopper.best == pytest.approx(0.6)
    report, extra, done = run.run_epoch(4)
    assert done == "patience" and report["best_epoch"] == 4
    assert extra["test_outputs"].shape[0] == len(run.test)  # the outer fold scored once, with epoch 4's weights


def test_a_trial_whose_patience_is_its_schedule_runs_to_the_end_and_keeps_its_best_epoch(
    ray_session, sstack_manifest, tmp_path, monkeypatch
):
    """Multi-stack's default (patience = the whole schedule): a falling inner-validation ROC-AUC does not
    stop the trial; it trains every epoch, and the outer fold is scored once at the end with the best
    epoch's weights (the first one kept, at min_epochs), not the last epoch's."""
    run = _falling_run(sstack_manifest, tmp_path, monkeypatch, min_epochs=3, patience=6)
    kept = None
    reasons = []
    for e in range(6):
        report, extra, done = run.run_epoch(e)
        reasons.append(done)
        if e == 2:  # the best epoch's weights, as the trial holds them
            kept = {k: v.clone() for k, v in run.judged.state_dict().items()}
    assert reasons == ["", "", "", "", "", "max_epochs"]
    assert report["best_epoch"] == 3 and run.stopper.best == pytest.approx(0.7)
    assert extra["test_outputs"].shape[0] == len(run.test)
    assert all(torch.equal(run.judged.state_dict()[k], v) for k, v in kept.items())  # epoch 3's, loaded back


def test_asha_compares_trials_only_within_their_fold():
    from ray.tune.schedulers import TrialScheduler

    class Trial:
        def __init__(self, fold, tid):
            self.config, self.trial_id = {"fold": fold}, tid

        def __repr__(self):
            return self.trial_id

    job = mt.TuneJobConfig(manifest="m", out="o", max_epochs=8, grace_period=1, reduction_factor=2)
    sched = mt.per_fold_asha(job)
    sched.set_search_properties(mt.METRIC, "max")
    good0, bad0, weak1 = Trial(0, "good0"), Trial(0, "bad0"), Trial(1, "weak1")
    for tr in (good0, bad0, weak1):
        sched.on_trial_add(None, tr)

    def res(v):
        return {mt.METRIC: v, "training_iteration": 1}

    assert sched.on_trial_result(None, good0, res(0.9)) == TrialScheduler.CONTINUE
    assert sched.on_trial_result(None, bad0, res(0.2)) == TrialScheduler.STOP  # beaten in its own fold
    # far below fold 0's trials, but alone in fold 1: a global ASHA would cut it, per fold it goes on
    assert sched.on_trial_result(None, weak1, res(0.3)) == TrialScheduler.CONTINUE


def test_every_trial_failing_raises_the_first_error_in_one_line(ray_session, sstack_manifest, tmp_path):
    manifest, _ = sstack_manifest
    job = mt.TuneJobConfig(
        manifest=manifest,
        out=str(tmp_path / "run"),
        backbones=("compact_cnn",),
        max_epochs=1,
        samples=1,
        lr_min=1e-3,
        lr_max=1e-3,
        size=64,
        pretrained="none",
        verbose=0,
    )
    with pytest.raises(ValueError) as err:
        mt.search_phase(job, 3, ["1", "2", "3", "4"], caches={}, name="broken")  # no cache for 64 px
    msg = str(err.value)
    assert msg.startswith("every broken trial failed; the first:") and "KeyError" in msg and "\n" not in msg


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
        "compact_cnn",
        "--samples",
        "1",
        "--max-epochs",
        "2",
        "--size",
        "64",
        "--batch-size",
        "16",
        "--no-asha",
        "--pretrained",
        "none",
        "--max-concurrent",
        "1",
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
    assert len(before) < 3 or "--resume" in text
    again = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    after = _finished_trials(out / "search")
    assert len(after) == 3
    for trial, n_results in before.items():  # finished trials were not trained again
        assert after[trial] == n_results
    assert (out / "artifact" / "weights.pt").exists() and "winner:" in again.stdout


def test_cache_leaves_out_a_corrupt_image_and_keeps_the_rest(ray_session, corpus_copy):
    root, _ = corpus_copy
    victim = sorted((root / "sstack").glob("[0-9]/*.png"))[0]
    victim.write_bytes(victim.read_bytes()[:200])
    table, _ = corpus.index_corpus(str(root), folds=3)
    rows = data.select(table, stack="sstack")
    c = data.build_cache(rows, DataConfig(size=32))
    assert len(c) == rows.num_rows - 1 and len(c.errors) == 1 and victim.name in c.errors[0]
    assert isinstance(c, engine.Cache)


def test_two_searches_on_one_small_cluster_both_finish(ray_session, sstack_manifest, tmp_path):
    """Two `tune` drivers on one 2-CPU cluster: each decodes its images before any trial (Ray Data
    tasks), and trials need no data tasks, so trials of one search holding every CPU delay the other's
    decoding but never stall it; both finish with their artifacts, and the same figures."""
    manifest, _ = sstack_manifest
    address = ray_session.get_runtime_context().gcs_address
    base = [sys.executable, "-m", "msc_ray.cli", "tune", manifest, "--backbones", "compact_cnn", "--samples", "1"]
    base += ["--max-epochs", "2", "--size", "32", "--batch-size", "16", "--pretrained", "none", "--address", address]
    procs = [
        subprocess.Popen(
            base + ["--out", str(tmp_path / name)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for name in ("a", "b")
    ]
    for proc in procs:
        out = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, out[-2000:]
    for name in ("a", "b"):
        assert (tmp_path / name / "artifact" / "weights.pt").exists()
    # the same command and seed give the same figures, whichever process ran a trial (Tune hands an ended
    # trial's process to the next trial) and however the two searches' trials interleaved
    tables = [(tmp_path / name / "table.md").read_text() for name in ("a", "b")]
    assert tables[0] == tables[1] and "compact_cnn" in tables[0]
    temps = [json.loads((tmp_path / n / "artifact" / "config.json").read_text())["calibration"] for n in ("a", "b")]
    assert temps[0] == temps[1]


def test_a_search_knows_how_many_trials_a_finished_experiment_holds(monkeypatch):
    """With --max-concurrent, Tune creates trials only as slots free up: a Ctrl-C between one trial's end
    and the next one's creation returns a grid whose trials all finished. The search must still see it
    as interrupted, so it counts the trials its space makes."""
    from msc_ray.tune import search as search_mod
    from msc_ray.tune.experiment import expected_trials

    seen = {}

    def capture(job, name, space, caches, *, asha, resume, num_samples=1, ranked=True):
        seen.update(space=space, num_samples=num_samples, asha=asha, ranked=ranked)
        return []

    monkeypatch.setattr(search_mod, "_run_experiment", capture)
    job = mt.TuneJobConfig(manifest="m", out="o", backbones=("compact_cnn", "resnet18"), samples=5)
    mt.search_phase(job, 3, ["1", "2", "3", "4"], caches={})
    assert expected_trials(seen["space"], seen["num_samples"]) == 2 * 3 * 5
    fixed = dataclasses.replace(job, lr_min=job.lr_max, wd_min=job.wd_max)  # nothing to sample: one per cell
    mt.search_phase(fixed, 4, ["1", "2", "3", "4"], caches={})
    assert expected_trials(seen["space"], seen["num_samples"]) == 2 * 4
    # one backbone too: the export joins the experiment as a fifth trial, which reports no validation metric
    one = dataclasses.replace(fixed, backbones=("compact_cnn",))
    mt.search_phase(one, 4, ["1", "2", "3", "4"], caches={}, with_export=True)
    assert expected_trials(seen["space"], seen["num_samples"]) == 4 + 1
    assert seen["space"]["fold"] == {"grid_search": [-1, 0, 1, 2, 3]} and not seen["ranked"] and not seen["asha"]
    with pytest.raises(ValueError, match="known before it runs"):
        mt.search_phase(fixed, 4, ["1", "2", "3", "4"], caches={}, with_export=True)


def test_job_settings_out_of_range_are_refused_naming_the_option():
    classes = {"sstack": ["1", "2", "3", "4"]}
    mt.TuneJobConfig(manifest="m", out="o", backbones=("compact_cnn",), coverage_weight=0.0).validate(classes)
    with pytest.raises(ValueError, match="--coverage-weight -1"):
        mt.TuneJobConfig(manifest="m", out="o", backbones=("compact_cnn",), coverage_weight=-1.0).validate(classes)
    with pytest.raises(ValueError, match="--views 3"):
        mt.TuneJobConfig(manifest="m", out="o", backbones=("compact_cnn",), views=3).validate(classes)
    with pytest.raises(ValueError, match="--stack mstack"):
        mt.TuneJobConfig(manifest="m", out="o", backbones=("compact_cnn",), stack="mstack").validate(classes)
    # the options alone (what the CLI checks before it indexes a corpus) need no manifest's stacks
    mt.TuneJobConfig(manifest="", out="o", backbones=("compact_cnn",), stack="mstack").check_options()
    with pytest.raises(ValueError, match="--views 3"):
        mt.TuneJobConfig(manifest="", out="o", backbones=("compact_cnn",), views=3).check_options()
    with pytest.raises(ValueError, match="--precision fp16: choose one of auto, bf16, fp32"):
        mt.TuneJobConfig(manifest="m", out="o", backbones=("compact_cnn",), precision="fp16").validate(classes)
    with pytest.raises(ValueError, match="--average-epochs -1"):
        mt.TuneJobConfig(manifest="m", out="o", backbones=("compact_cnn",), average_epochs=-1.0).validate(classes)
    with pytest.raises(ValueError, match="--inner-fold test: choose one of validate, train"):
        mt.TuneJobConfig(manifest="m", out="o", backbones=("compact_cnn",), inner_fold="test").validate(classes)
    one = dict(manifest="m", out="o", backbones=("compact_cnn",), lr_min=2e-3, lr_max=2e-3, wd_min=1e-5, wd_max=1e-5)
    mt.TuneJobConfig(**one, inner_fold="train").validate(classes)
    # a choice between backbones or sampled hyper-parameters needs the inner validation fold
    for other in (dict(backbones=("compact_cnn", "coverage_unet")), dict(lr_max=3e-3), dict(wd_max=1e-3)):
        with pytest.raises(ValueError, match="--inner-fold train: only for a search with one configuration"):
            mt.TuneJobConfig(**{**one, **other}, inner_fold="train").validate(classes)


def _random_cache(n: int, side: int, seed: int = 0) -> engine.Cache:
    rng = np.random.default_rng(seed)
    return engine.Cache(
        images=rng.integers(0, 255, (n, 3, side, side), dtype=np.uint8),
        labels=np.arange(n) % 4,
        rows=np.arange(n),
        folds=np.arange(n) % 3,
        keys=[f"i{i}" for i in range(n)],
        confluence=np.full(n, np.nan, np.float32),
    )


def test_a_search_started_from_an_artifact_needs_its_backbone_and_loads_it_in_every_trial(tmp_path, monkeypatch):
    """``--pretrained ARTIFACT``: refused before any trial when a backbone of the search is not the
    artifact's; a trial (Ray-free) starts from the artifact's features, with a relative path too."""
    classes = {"sstack": ["1", "2", "3", "4"]}
    torch.manual_seed(1)
    src = models.build_classifier("compact_cnn", 4, image_size=64, extra_outputs=1)
    art = tmp_path / "art"
    models.save_artifact(art, src.state_dict(), {"kind": "classifier", "architecture": "compact_cnn"})
    job = mt.TuneJobConfig(manifest="m", out="o", backbones=("compact_cnn", "resnet18"), pretrained=str(art))
    with pytest.raises(ValueError, match=r"--pretrained .*art: a compact_cnn model; the search's backbones must all"):
        job.validate(classes)
    job = dataclasses.replace(job, backbones=("compact_cnn",), coverage=False, size=32, max_epochs=2)
    job.validate(classes)
    cache = _random_cache(12, 32)
    config = {"job": dataclasses.asdict(job), "phase": "search", "backbone": "compact_cnn", "fold": 0, "folds": 3}
    config.update(classes=classes["sstack"], lr=1e-3, weight_decay=0.0)
    run = mt.ClassifierRun(config, {32: cache})
    got, had = run.model.state_dict(), src.state_dict()
    assert all(torch.equal(got[k].cpu(), had[k]) for k in got if k.startswith("features."))
    monkeypatch.chdir(tmp_path)
    rel = mt.absolute(dataclasses.replace(job, pretrained="art"))
    assert rel.pretrained == str(art)


def test_input_size_epochs_patience_and_coverage_weight_default_by_stack_and_explicit_values_are_kept():
    """Left at 0 (the CLI's defaults; the coverage weight at None), the input side, the epochs, the patience
    and the coverage term's weight are the stack's measured ones: multi-stack cells vanish at the 64 px that
    serve single-stack images, multi-stack trials run their whole schedule (patience = epochs) whatever its
    length, and multi-stack weighs the coverage map more; saved configs hold the values. A weight given,
    0 included, is kept."""
    single = mt.TuneJobConfig(manifest="m", out="o", stack="sstack")
    multi = mt.TuneJobConfig(manifest="m", out="o", stack="mstack")
    assert (single.size, single.max_epochs, single.patience, single.coverage_weight) == (64, 25, 6, 3.0)
    assert (multi.size, multi.max_epochs, multi.patience, multi.coverage_weight) == (128, 60, 60, 16.0)
    explicit = mt.TuneJobConfig(
        manifest="m", out="o", stack="mstack", size=96, max_epochs=3, patience=2, coverage_weight=0.0
    )
    assert (explicit.size, explicit.max_epochs, explicit.patience, explicit.coverage_weight) == (96, 3, 2, 0.0)
    longer = mt.TuneJobConfig(manifest="m", out="o", stack="mstack", max_epochs=80)
    assert longer.patience == 80
    other = mt.TuneJobConfig(manifest="m", out="o", stack="nsc")  # a corpus's own stack name: single-layer's
    assert (other.size, other.max_epochs, other.patience, other.coverage_weight) == (64, 25, 6, 3.0)
    again = from_dict(mt.TuneJobConfig, dataclasses.asdict(multi))
    assert (again.size, again.max_epochs, again.patience, again.coverage_weight) == (128, 60, 60, 16.0)


def test_a_ctrl_c_after_a_fit_interrupts_the_program_and_is_not_swallowed(ray_session, tmp_path):
    """Tune leaves its SIGINT handler installed when a fit returns; a Ctrl-C while the search picks its
    winner or starts its next phase would only end the finished experiment and be lost. After
    ``fit_tuner`` the handler is the one from before the fit, and a Ctrl-C raises KeyboardInterrupt."""
    from ray import tune

    def trainable(config):
        tune.report({"x": config["x"]})

    before = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own, whatever ran before in this process
    try:
        _fit_then_ctrl_c(tune, trainable, tmp_path)
    finally:
        signal.signal(signal.SIGINT, before)


def _fit_then_ctrl_c(tune, trainable, tmp_path):
    tuner = tune.Tuner(
        trainable,
        param_space={"x": 1},
        run_config=tune.RunConfig(name="ctrl-c", storage_path=str(tmp_path), verbose=0),
    )
    grid = mt.fit_tuner(tuner, quiet=True)
    assert grid.num_terminated == 1
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # the handler runs at the next bytecode of the main thread


def test_a_trial_validates_keeps_and_resumes_the_averaged_weights(tmp_path):
    """``average_epochs`` > 0: what validates, what is kept as the best epoch and what the checkpoint
    holds is the moving average of the weights, not the last step's; a resumed trial goes on with the
    same average. Without it the model's own weights are judged."""
    from ray import tune

    job = mt.TuneJobConfig(
        manifest="m",
        out="o",
        backbones=("compact_cnn",),
        coverage=False,
        size=32,
        max_epochs=4,
        min_epochs=1,
        batch_size=4,
        pretrained="none",
        average_epochs=1.0,
    )
    config = {"job": dataclasses.asdict(job), "phase": "search", "backbone": "compact_cnn", "fold": 0, "folds": 3}
    config.update(classes=["1", "2", "3", "4"], lr=1e-3, weight_decay=0.0)
    cache = _random_cache(24, 32)
    run = mt.ClassifierRun(config, {32: cache})
    assert run.judged is run.average.module and run.average.n_averaged == 0
    run.run_epoch(0)
    assert int(run.average.n_averaged) == len(run.train) // job.batch_size  # one update per step
    own, avg = run.model.state_dict(), run.judged.state_dict()
    moved = [k for k in own if own[k].is_floating_point() and not torch.equal(own[k], avg[k])]
    assert moved and "features.1.weight" in moved
    assert run.stopper.best_epoch == 1
    assert all(torch.equal(run.stopper.best_state[k], avg[k].cpu()) for k in avg)
    run.save(str(tmp_path), 0, {})
    again = mt.ClassifierRun(config, {32: cache})
    again.restore(tune.Checkpoint.from_directory(str(tmp_path)))
    assert again.start == 1 and int(again.average.n_averaged) == int(run.average.n_averaged)
    back = again.judged.state_dict()
    assert all(torch.equal(back[k], avg[k]) for k in avg)
    last_step = dataclasses.asdict(dataclasses.replace(job, average_epochs=0.0))
    plain = mt.ClassifierRun({**config, "job": last_step}, {32: cache})
    assert plain.average is None and plain.judged is plain.model
