"""Every command from a fresh working folder with relative arguments, as a user types them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq


def _run(args, cwd, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, "-m", "msc_ray.cli", *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout
    )
    assert proc.returncode == 0, f"{args[0]}: {proc.stdout[-1500:]}{proc.stderr[-1500:]}"
    # what Ray's workers print reaches the console too: no per-second warning from Ray Train's placement-group
    # cleaner about the State API a Ray started here does not run, and no warning about read-only arrays
    # from the object store (the training cache copies them)
    for noise in ("State API may be temporarily unavailable", "NumPy array is not writable"):
        assert noise not in proc.stdout + proc.stderr, f"{args[0]}: {noise}"
    return proc.stdout


def test_every_command_with_relative_paths(tmp_path):
    _run(["synth", "c", "--n", "30", "--size", "64", "--stack", "sstack", "--seed", "4"], tmp_path)
    assert "manifest:" in _run(["index", "c", "--folds", "3", "--out", "m.parquet"], tmp_path)
    out = _run(
        [
            "tune",
            "c",
            "--out",
            "run2",
            "--stack",
            "sstack",
            "--backbones",
            "compact_cnn",
            "--max-epochs",
            "1",
            "--samples",
            "1",
            "--folds",
            "3",
            "--lr",
            "1e-3",
            "--pretrained",
            "none",
            "--no-coverage",
        ],
        tmp_path,
    )
    assert "winner: compact_cnn" in out and (tmp_path / "run2" / "artifact" / "weights.pt").exists()
    assert json.loads((tmp_path / "run2" / "artifact" / "config.json").read_text())["coverage_supervision"] is False
    _run(
        [
            "train-detector",
            "m.parquet",
            "--out",
            "det",
            "--workers",
            "1",
            "--only-folds",
            "0",
            "--epochs",
            "1",
            "--size",
            "64",
        ],
        tmp_path,
    )
    assert (tmp_path / "det" / "artifact" / "config.json").exists()
    _run(
        ["train-segmenter", "m.parquet", "--out", "seg", "--workers", "1", "--only-folds", "0", "--epochs", "1"]
        + ["--views", "4"],
        tmp_path,
    )
    assert (tmp_path / "seg" / "metrics.md").exists()
    assert json.loads((tmp_path / "seg" / "artifact" / "config.json").read_text())["views"] == 4
    _run(["morphology", "c", "--out", "morph"], tmp_path)
    _run(["train-potency", "morph/images.parquet", "--out", "pot", "--folds", "3", "--samples", "1"], tmp_path)
    assert (tmp_path / "pot" / "artifact" / "model.txt").exists()
    _run(["score", "c/sstack", "--classifier", "run2/artifact", "--detector", "det/artifact", "--out", "rep"], tmp_path)
    report = _run(["report", "rep", "--plots", "plots"], tmp_path)
    assert "30 rows" in report and (tmp_path / "plots" / "bands.png").exists()
    rows = pq.read_table(tmp_path / "rep" / "parts").to_pylist()
    assert len(rows) == 30 and all(r["status"] == "ok" for r in rows)
    edges = {"0-40%": (0, 40), "40-60%": (40, 60), "60-80%": (60, 80), "80-100%": (80, 100)}
    for r in rows:  # the confluence estimate always sits inside the predicted band
        lo, hi = edges[r["band"]]
        assert lo <= r["confluence_pct"] <= hi


def test_tune_reads_multi_stack_images_at_their_own_input_size_by_default(tmp_path):
    """Without --size, a multi-stack search trains at 128 px (its thin cells vanish at the 64 px that
    serve single-stack images): the exported artifact says so (explicit values: test_tune.py)."""
    _run(["synth", "c", "--n", "24", "--size", "64", "--stack", "mstack", "--seed", "5"], tmp_path)
    tiny = ["--stack", "mstack", "--backbones", "compact_cnn", "--max-epochs", "1", "--samples", "1", "--folds", "3"]
    tiny += ["--lr", "1e-3", "--pretrained", "none", "--no-coverage", "--views", "1"]
    # one configuration (one backbone, --lr, --weight-decay): the inner fold may train (--inner-fold train)
    _run(["tune", "c", "--out", "run", *tiny, "--weight-decay", "1e-5", "--inner-fold", "train"], tmp_path)
    config = json.loads((tmp_path / "run" / "artifact" / "config.json").read_text())
    assert config["data"]["size"] == 128 and config["data"]["equalize"] is True, config["data"]
    assert config["hyperparameters"] == {"lr": 1e-3, "weight_decay": 1e-5}
    assert config["calibration"]["fitted_on"].startswith("pooled outer folds"), config["calibration"]
    # --coverage-weight left unset: every trial's job holds the stack's (16 multi-stack, 3 single-stack)
    params = [json.loads(f.read_text()) for f in (tmp_path / "run" / "search").glob("compact_cnn-fold*/params.json")]
    assert len(params) == 4 and {p["job"]["coverage_weight"] for p in params} == {16.0}


def test_a_failing_tune_names_the_real_error_in_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, "-m", "msc_ray.cli", "tune", "nowhere", "--out", "run"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "nowhere" in last


def test_a_wrong_training_option_is_named_before_the_corpus_is_indexed(tmp_path):
    """tune, train-detector, train-segmenter and morphology check their options first: a wrong one is a
    one-line error naming it, and the corpus is not indexed (no manifest is written under --out)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    _run(["synth", "c", "--n", "8", "--size", "64", "--stack", "sstack"], tmp_path)
    for command, option, value, more in (
        ("train-detector", "--precision", "fp16", []),
        ("train-segmenter", "--views", "3", []),
        ("train-segmenter", "--crop", "200", ["--size", "128"]),  # a crop larger than the images
        ("train-detector", "--crop", "8", []),  # smaller than a few cells
        ("morphology", "--views", "3", ["--segmenter", "art"]),
        ("morphology", "--views", "4", []),  # views of the corpus's own masks
        ("tune", "--views", "3", []),
        ("tune", "--inner-fold", "train", []),  # two backbones by default: a choice needs the inner fold
        ("tune", "--precision", "fp16", []),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "msc_ray.cli", command, "c", "--out", command, option, value, *more],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert proc.returncode == 1, proc.stderr[-1500:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("error:") and option in last and value in last, last
        assert not (tmp_path / command / "manifest.parquet").exists()  # refused before any indexing


def test_a_local_ray_gets_msc_rays_settings_unless_the_user_set_them(monkeypatch):
    from msc_ray import LOCAL_RAY_ENV, use_local_ray_env

    (key,) = LOCAL_RAY_ENV
    monkeypatch.setenv(key, "5")  # the user's own value wins
    use_local_ray_env()
    assert os.environ[key] == "5"
    monkeypatch.delenv(key)
    use_local_ray_env()
    assert os.environ[key] == LOCAL_RAY_ENV[key] == "0.25"


def test_every_worker_of_a_local_ray_inherits_those_settings(ray_session):
    """The suite's Ray is started as the CLI starts its own: Ray Train's controller, an actor in a
    worker process, reads the setting there."""
    from msc_ray import LOCAL_RAY_ENV

    @ray_session.remote
    def seen() -> dict:
        return {k: os.environ.get(k) for k in LOCAL_RAY_ENV}

    assert ray_session.get(seen.remote()) == LOCAL_RAY_ENV
