"""Proof on more than one node: a Ray cluster of a head that only schedules (0 CPUs) and two worker
nodes, started with ``ray start`` on this machine with token authentication, the run storage on the
local S3 server, every command sent through ``ray job submit``."""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from msc_ray import models, score, synth
from tests.conftest import upload_dir
from tests.localcluster import LocalCluster

JOBS = Path(__file__).resolve().parents[1] / "jobs"
TINY = ["--backbones", "compact_cnn", "--max-epochs", "1", "--samples", "1", "--folds", "3", "--lr", "1e-3"]
TINY += ["--pretrained", "none", "--size", "32"]


def _keys(client, bucket: str, prefix: str) -> list[str]:
    keys, token = [], None
    while True:
        kw = {"Bucket": bucket, "Prefix": prefix, **({"ContinuationToken": token} if token else {})}
        resp = client.list_objects_v2(**kw)
        keys += [o["Key"] for o in resp.get("Contents", [])]
        if not resp.get("IsTruncated"):
            return keys
        token = resp["NextContinuationToken"]


def _ok(res) -> str:
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


@pytest.mark.slow
def test_tune_train_and_score_on_three_nodes_with_storage_in_s3_and_a_lost_node(s3_server, tmp_path):
    client = s3_server.client()
    client.create_bucket(Bucket="multinode")
    corpus = tmp_path / "corpus"
    rows = synth.synthesize(corpus, synth.SynthConfig(n=30, size=64, seed=11, abnormal_fraction=0.5))
    upload_dir(client, corpus, "multinode", "corpus")
    for stack in ("sstack", "mstack"):  # the archive: both stacks' images as captured (and their XML)
        upload_dir(client, corpus / stack, "multinode", f"archive/{stack}")
    n_images = len(rows)
    # a short folder: Ray's socket paths under it must stay within 107 bytes
    cluster = LocalCluster(Path(tempfile.mkdtemp(prefix="mscray-", dir="/tmp")))
    try:
        cluster.start_head()
        cluster.wait_for_nodes(1)
        # workers scale from zero: a local --out cannot be shown to be shared, so it is refused at once
        res = cluster.submit(
            [str(JOBS / "tune_classifier.py"), "s3://multinode/corpus", "--out", str(tmp_path / "run"), *TINY]
        )
        assert res.returncode != 0
        assert "give shared storage (s3://bucket/prefix" in res.stdout + res.stderr
        assert not (tmp_path / "run" / "search").exists()

        cluster.add_worker(cpus=2)
        cluster.add_worker(cpus=2)
        cluster.wait_for_nodes(3)
        # one search per stack, both jobs on the cluster at once
        jobs = {}
        for stack in ("sstack", "mstack"):
            submitted = _ok(
                cluster.submit(
                    [str(JOBS / "tune_classifier.py"), "s3://multinode/corpus", "--out", f"s3://multinode/runs/{stack}"]
                    + ["--stack", stack, *TINY],
                    wait=False,
                )
            )
            jobs[stack] = re.search(r"raysubmit_\w+", submitted).group(0)
        for stack, job_id in jobs.items():
            status, logs = cluster.wait_job(job_id)
            assert status == "SUCCEEDED", logs[-3000:]
            assert f"s3://multinode/runs/{stack}/artifact" in logs
        _ok(
            cluster.submit(
                [str(JOBS / "train_detector.py"), "s3://multinode/runs/sstack/manifest.parquet"]
                + ["--out", "s3://multinode/runs/det", "--workers", "2", "--placement", "SPREAD", "--only-folds", "0"]
                + ["--epochs", "2", "--size", "64", "--min-epochs", "1"]
            )
        )
        # the two DDP workers ran on different nodes
        workers = cluster.actors("RayTrainWorker")
        assert len(workers) == 2 and len({w["node_id"] for w in workers}) == 2
        keys = set(_keys(client, "multinode", "runs/"))
        for run in ("sstack", "mstack", "det"):
            assert {f"runs/{run}/artifact/config.json", f"runs/{run}/artifact/weights.pt"} <= keys
        assert {"runs/sstack/table.md", "runs/sstack/summary.json", "runs/det/metrics.md"} <= keys
        assert any(re.fullmatch(r"runs/det/fold0/checkpoint_[^/]+/state\.pt", k) for k in keys)
        assert any(re.fullmatch(r"runs/sstack/search/[^/]+/checkpoint_[^/]+/state\.pt", k) for k in keys)

        # scoring a mixed archive with one classifier per stack; a worker node dies mid-run
        args = [str(JOBS / "score_archive.py"), "s3://multinode/archive", "--out", "s3://multinode/reports/qc"]
        args += ["--classifier", "sstack=s3://multinode/runs/sstack/artifact"]
        args += ["--classifier", "mstack=s3://multinode/runs/mstack/artifact"]
        args += ["--detector", "s3://multinode/runs/det/artifact", "--chunk-size", "4", "--batch-size", "4"]
        submitted = _ok(cluster.submit(args, wait=False))
        job_id = re.search(r"raysubmit_\w+", submitted).group(0)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if [k for k in _keys(client, "multinode", "reports/qc/parts/") if k.endswith(".parquet")]:
                break
            assert cluster.job_status(job_id) in ("PENDING", "RUNNING"), cluster.job_logs(job_id)[-3000:]
            time.sleep(0.5)
        assert cluster.job_status(job_id) == "RUNNING", "the job ended before a node could be lost"
        cluster.kill_worker(1)
        while cluster.job_status(job_id) in ("PENDING", "RUNNING") and time.monotonic() < deadline + 300:
            time.sleep(2)
        logs = cluster.job_logs(job_id)
        assert cluster.job_status(job_id) == "SUCCEEDED", logs[-3000:]
        # the cluster saw the node go (after its health checks time out)
        lost = time.monotonic() + 90
        while cluster.alive_nodes() != 2 and time.monotonic() < lost:
            time.sleep(3)
        assert cluster.alive_nodes() == 2
        report = score.read_report("s3://multinode/reports/qc").to_pylist()
        assert len(report) == n_images and len({r["uri"] for r in report}) == n_images
        versions = {s: models.read_config(f"s3://multinode/runs/{s}/artifact")["version"] for s in ("sstack", "mstack")}
        for r in report:
            assert r["stack"] in versions
            if r["status"] == "ok":
                assert r["classifier_version"] == versions[r["stack"]]
        # rows lost with the node (if any) are transient: the next run scores exactly those
        transient = [r for r in report if r["error_kind"] == "transient"]
        _ok(cluster.submit(args))
        again = score.read_report("s3://multinode/reports/qc").to_pylist()
        assert len(again) == n_images and all(r["status"] == "ok" for r in again), [r["error"] for r in again][:3]
        print(f"lost-node run: {len(transient)} transient rows, rescored by the next run")
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)
