from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from msc_ray import metrics, models, score


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """A real (untrained) classifier and detector artifact: scoring is under test, not accuracy."""
    root = tmp_path_factory.mktemp("artifacts")
    torch.manual_seed(0)
    clf = models.build_classifier("mobilenet_v3_small", 4, image_size=64)
    models.save_artifact(
        root / "clf",
        clf.state_dict(),
        {
            "kind": "classifier",
            "architecture": "mobilenet_v3_small",
            "classes": ["1", "2", "3", "4"],
            "stack": "sstack",
            "data": {"size": 64, "channels": 3, "equalize": False},
            "dropout": 0.5,
            "temperature": 1.5,
        },
    )
    det = models.build_detector("resnet18_fpn", image_size=64)
    models.save_artifact(
        root / "det",
        det.state_dict(),
        {
            "kind": "detector",
            "architecture": "resnet18_fpn",
            "classes": ["Flatten"],
            "image_size": 64,
            "score_threshold": 0.0,
            "nms_iou": 0.5,
        },
    )
    return root / "clf", root / "det"


@pytest.fixture()
def archive(small_corpus, tmp_path):
    """Production-like archive: both stacks' images, two broken images, one non-image object."""
    src, rows = small_corpus
    root = tmp_path / "archive"
    for r in rows:
        dst = root / r["image"]
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / r["image"], dst)
    (root / "sstack" / "1" / "S999_d03_c.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (root / "mstack" / "2" / "M999_d01_c.png").write_bytes(b"")
    (root / "README.txt").write_text("daily captures")
    return root, len(rows) + 2


def test_local_archive_report_exactly_once(ray_session, archive, artifacts, tmp_path):
    root, n_images = archive
    clf, det = artifacts
    out = str(tmp_path / "report")
    cfg = score.ScoreConfig(archive=str(root), classifier=str(clf), detector=str(det), out=out, chunk_size=20)
    s = score.score_archive(cfg)
    assert (s.listed, s.ignored, s.scored, s.errors) == (n_images + 1, 1, n_images, 2)
    t = score.read_report(out).to_pylist()
    assert len(t) == n_images and len({r["uri"] for r in t}) == n_images
    bad = {r["key"]: r["error"] for r in t if r["status"] == "error"}
    assert set(bad) == {"sstack/1/S999_d03_c.png", "mstack/2/M999_d01_c.png"}
    assert bad["mstack/2/M999_d01_c.png"] == "mstack/2/M999_d01_c.png: empty file (zero bytes)"
    assert bad["sstack/1/S999_d03_c.png"].startswith("sstack/1/S999_d03_c.png: truncated or corrupt image")
    for r in t:
        if r["status"] != "ok":
            continue
        assert sum(r["probabilities"]) == pytest.approx(1.0, abs=1e-4)
        assert r["band"] in ("0-40%", "40-60%", "60-80%", "80-100%") and 0 <= r["confluence_pct"] <= 100
        # this model has no confluence output: the order-aware position inside the predicted band
        expect = metrics.confluence_in_band(np.array([r["probabilities"]]))[0]
        assert r["confluence_pct"] == pytest.approx(expect, rel=1e-5)
        lo, hi = (int(v.rstrip("%")) for v in r["band"].split("-"))
        assert lo <= r["confluence_pct"] <= hi
        assert r["vessel"] and r["day"] >= 1 and r["position"]
        assert r["stack"] == r["key"].split("/")[0]
        if r["stack"] == "sstack":  # the detector runs on single-stack images only
            assert r["n_abnormal"] == len(r["abnormal_boxes"]) > 0
            for b in r["abnormal_boxes"]:
                assert 0 <= b["x1"] < b["x2"] <= 64.5 and 0 <= b["y1"] < b["y2"] <= 64.5 and 0 <= b["score"] <= 1
        else:
            assert r["abnormal_boxes"] is None
        assert r["classifier_version"] and r["detector_version"] and r["run_id"] == s.run_id
    # a rerun adds nothing; a new object adds exactly its row
    again = score.score_archive(cfg)
    assert again.scored == 0 and again.skipped == n_images
    shutil.copyfile(root / t[0]["key"], root / "sstack" / "3" / "S777_d09_tl.png")
    third = score.score_archive(cfg)
    assert third.scored == 1 and len(score.read_report(out)) == n_images + 1
    # a new model version scores everything again, as new rows
    models.save_artifact(
        tmp_path / "clf2",
        {k: v + 0.01 if v.is_floating_point() else v for k, v in models.read_artifact(clf)[1].items()},
        {k: v for k, v in models.read_artifact(clf)[0].items() if k not in ("version", "format")},
    )
    fourth = score.score_archive(score.ScoreConfig(archive=str(root), classifier=str(tmp_path / "clf2"), out=out))
    assert fourth.scored == n_images + 1


def _commits(client, bucket: str, prefix: str) -> list[str]:
    """The commit manifests, not the directory marker pyarrow writes when it creates ``_commits/``
    (which appears before the first part is committed)."""
    resp = client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/_commits/")
    return [o["Key"] for o in resp.get("Contents", []) if o["Key"].endswith(".json")]


def test_s3_archive_killed_and_rerun_gives_one_row_per_object(ray_session, s3_server, archive, artifacts):
    from tests.conftest import upload_dir

    root, n_images = archive
    clf, _ = artifacts
    client = s3_server.client()
    client.create_bucket(Bucket="plant")
    upload_dir(client, root, "plant", "captures/2026")
    cmd = [
        sys.executable,
        "-m",
        "msc_ray.cli",
        "score",
        "s3://plant/captures/2026",
        "--classifier",
        str(clf),
        "--out",
        "s3://plant/reports/qc",
        "--chunk-size",
        "5",
        "--address",
        ray_session.get_runtime_context().gcs_address,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while not _commits(client, "plant", "reports/qc") and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    proc.send_signal(signal.SIGKILL)  # killed half-way: no clean-up of any kind
    proc.wait()
    kept = _commits(client, "plant", "reports/qc")
    assert 0 < len(kept) < -(-n_images // 5)
    partial = score.read_report("s3://plant/reports/qc")
    assert 0 < partial.num_rows < n_images
    assert partial.num_rows == 5 * len(kept)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    t = score.read_report("s3://plant/reports/qc")
    assert t.num_rows == n_images
    assert len(set(t.column("uri").to_pylist())) == n_images
    assert len(set(t.column("run_id").to_pylist())) == 2  # the killed run's committed parts were kept
    assert sorted(r["key"] for r in t.to_pylist() if r["status"] == "error") == [
        "mstack/2/M999_d01_c.png",
        "sstack/1/S999_d03_c.png",
    ]


def _fails_fast(args, env_update, needle, secret=None):
    env = {**os.environ, **env_update}
    t0 = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-m", "msc_ray.cli", "score", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    took = time.monotonic() - t0
    assert res.returncode == 1, res.stdout + res.stderr
    assert took < 30
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], res.stderr
    if secret:
        assert secret not in res.stdout + res.stderr


def test_object_store_failures_fail_fast_and_publish_nothing(s3_server, artifacts, tmp_path):
    clf, _ = artifacts
    client = s3_server.client()
    client.create_bucket(Bucket="failures")
    client.put_object(Bucket="failures", Key="in/sstack/1/a.png", Body=b"x")
    base = ["--classifier", str(clf), "--out", "s3://failures/report"]
    wrong = "WRONG" + "x" * 30
    _fails_fast(["s3://failures/in", *base], {"AWS_SECRET_ACCESS_KEY": wrong}, "s3://failures", secret=wrong)
    _fails_fast(
        ["s3://no-such-bucket/in", "--classifier", str(clf), "--out", str(tmp_path / "r")],
        {},
        "no-such-bucket",
    )
    _fails_fast(["s3://failures/in", *base, "--endpoint-url", "http://127.0.0.1:9"], {}, "s3://failures")
    assert client.list_objects_v2(Bucket="failures", Prefix="report").get("KeyCount", 0) == 0
    assert not (tmp_path / "r" / "_commits").exists()


def test_report_command_counts_and_plots(ray_session, archive, artifacts, tmp_path):
    root, n_images = archive
    clf, _ = artifacts
    out = tmp_path / "report"
    score.score_archive(score.ScoreConfig(archive=str(root), classifier=str(clf), out=str(out)))
    res = subprocess.run([sys.executable, "-m", "msc_ray.cli", "report", str(out)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert f"{n_images} rows" in res.stdout and "error=2" in res.stdout and "sstack=" in res.stdout
    assert (out / "plots" / "bands.png").stat().st_size > 5000
    assert (out / "plots" / "vessels.png").stat().st_size > 5000
    empty = subprocess.run(
        [sys.executable, "-m", "msc_ray.cli", "report", str(tmp_path / "none")],
        capture_output=True,
        text=True,
    )
    assert empty.returncode == 1 and "no committed rows" in empty.stderr
