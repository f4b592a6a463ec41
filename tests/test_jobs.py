from __future__ import annotations

import copy
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml

from msc_ray import models, score
from tests.localcluster import kill_processes_naming, submit_job

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_yaml_is_valid_for_the_ray_cluster_launcher():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(config)))  # raises on any schema violation
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}  # the head runs no tasks
    assert (
        types["gpu_worker"]["node_config"]["InstanceType"].startswith("g") and types["gpu_worker"]["min_workers"] == 0
    )
    assert types["cpu_worker"]["min_workers"] == 0 and config["idle_timeout_minutes"] > 0
    for t in types.values():
        assert "IamInstanceProfile" in t["node_config"]  # S3 through an instance profile, no keys
        assert t["node_config"]["BlockDeviceMappings"][0]["Ebs"]["VolumeSize"] >= 100
    assert any("pip install -e" in c for c in config["setup_commands"])
    # a locked-down head: token authentication on every node, the dashboard/job API on loopback only
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])
    assert "0.0.0.0" not in (ROOT / "cluster.yaml").read_text()
    assert "/home/ubuntu/.ray/auth_token" in config["file_mounts"]
    broken = copy.deepcopy(config)
    broken["available_node_types"]["cpu_worker"]["max_workers"] = "many"
    with pytest.raises(Exception, match="many"):
        validate_config(prepare_config(broken))


def test_kuberay_rayjob_has_token_auth_a_scheduling_head_and_storage_in_s3():
    job = yaml.safe_load((ROOT / "deploy" / "rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]["rayClusterSpec"]
    assert spec["authOptions"] == {"mode": "token"} and spec["rayVersion"] >= "2.60"
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert all(g["minReplicas"] == 0 for g in spec["workerGroupSpecs"])
    entry = job["spec"]["entrypoint"].split()
    assert entry[1].endswith("jobs/score_archive.py")
    for opt in ("--out", "--classifier", "--detector"):  # nothing a pod needs on another pod's disk
        values = [v for k, v in zip(entry, entry[1:], strict=False) if k == opt]
        assert values and all(v.split("=")[-1].startswith("s3://") for v in values)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_head(ray_bin: str, env: dict, temp_dir: str, log: Path) -> tuple[subprocess.Popen, str]:
    """``ray start --head --block`` on free ports, its output in ``log``; returns it and the job server's
    address once ``ray job list`` answers there. A head that exits first (a port taken between choosing
    it and binding it) is started again on new ports, once; then the test fails with its last lines."""
    for _ in range(2):
        port, dash = _free_port(), _free_port()
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [
                    ray_bin,
                    "start",
                    "--head",
                    "--block",
                    "--node-ip-address=127.0.0.1",
                    f"--port={port}",
                    "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dash}",
                    "--num-cpus=2",
                    # the suite's own Ray holds the default agent ports: give this head free ones
                    *(
                        f"--{opt}={_free_port()}"
                        for opt in (
                            "dashboard-agent-listen-port",
                            "dashboard-agent-grpc-port",
                            "runtime-env-agent-port",
                            "metrics-export-port",
                            "ray-client-server-port",
                        )
                    ),
                    f"--temp-dir={temp_dir}",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        address = f"http://127.0.0.1:{dash}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                ok = subprocess.run(
                    [ray_bin, "job", "list", "--address", address], capture_output=True, env=env, timeout=30
                )
                if ok.returncode == 0:
                    return proc, address
            except subprocess.TimeoutExpired:  # something else answers on that port, or nothing yet
                pass
            time.sleep(1)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            break
    tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-5:])
    pytest.fail(f"the Ray head's job server did not come up (exit status {proc.poll()}): {tail}")


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A separate local Ray head on 127.0.0.1 with the job server, shared by this module's job tests and
    stopped at the end: its processes are killed outright (``ray start --block`` can take over a minute to
    shut down on SIGTERM, and ``ray stop`` would stop the suite's own Ray too)."""
    short = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # Ray's socket paths must stay under ~107 characters
    ray_bin = str(Path(sys.executable).with_name("ray"))
    # Ray 2.60 clusters authenticate clients with a token: the head and the job client share one
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    proc, address = _start_head(ray_bin, env, short, tmp_path_factory.mktemp("head") / "ray-head.log")
    yield ray_bin, address, env
    kill_processes_naming(short)  # `ray start` and every process of its head: their arguments name its temp folder
    proc.wait(60)
    shutil.rmtree(short, ignore_errors=True)


def test_ray_job_submit_scores_an_archive(ray_head, small_corpus, tmp_path):
    ray_bin, address, env = ray_head
    src, rows = small_corpus
    archive = tmp_path / "archive"
    for r in rows[:10]:
        (archive / Path(r["image"]).name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / r["image"], archive / Path(r["image"]).name)
    (archive / "broken.png").write_bytes(b"no image")
    torch.manual_seed(0)
    clf = models.build_classifier("mobilenet_v3_small", 4, image_size=64)
    models.save_artifact(
        tmp_path / "clf",
        clf.state_dict(),
        {
            "kind": "classifier",
            "architecture": "mobilenet_v3_small",
            "classes": ["1", "2", "3", "4"],
            "stack": "sstack",
            "data": {"size": 64, "channels": 3},
        },
    )
    out = tmp_path / "report"
    runtime_env = json.dumps({"excludes": ["tests/", "quickstart-out/", ".git/", ".venv/"]})
    submit = [
        ray_bin,
        "job",
        "submit",
        "--address",
        address,
        "--working-dir",
        str(ROOT),
        "--runtime-env-json",
        runtime_env,
        "--",
        sys.executable,
        "jobs/score_archive.py",
        str(archive),
        "--classifier",
        str(tmp_path / "clf"),
        "--out",
        str(out),
        "--run-id",
        "submitted",
    ]
    res = submit_job(submit, env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "succeeded" in (res.stdout + res.stderr).lower()
    t = score.read_report(str(out)).to_pylist()
    assert len(t) == 11 and {r["run_id"] for r in t} == {"submitted"}
    assert [r["key"] for r in t if r["status"] == "error"] == ["broken.png"]


def test_serve_config_for_a_cluster_is_valid_and_builds_the_application(tmp_path):
    from ray.serve import Application
    from ray.serve.schema import ServeDeploySchema

    from msc_ray import serve as serve_mod

    cfg = yaml.safe_load((ROOT / "deploy" / "serve.yaml").read_text())
    ServeDeploySchema(**cfg)  # Serve's own schema for `serve deploy`
    assert cfg["http_options"]["host"] == "127.0.0.1"
    (app_cfg,) = cfg["applications"]
    assert app_cfg["import_path"] == "msc_ray.serve:app"
    args = app_cfg["args"]
    assert all(c.split("=")[-1].startswith("s3://") for c in args["classifier"]) and args["detector"].startswith(
        "s3://"
    )
    assert set(args) <= set(serve_mod.ServeConfig.__dataclass_fields__)
    assert args["min_replicas"] < args["max_replicas"]
    # the builder with local artifacts in place of the bucket's
    torch.manual_seed(0)
    models.save_artifact(
        tmp_path / "clf",
        models.build_classifier("compact_cnn", 4, image_size=32).state_dict(),
        {"kind": "classifier", "architecture": "compact_cnn", "classes": ["1", "2", "3", "4"], "data": {"size": 32}},
    )
    local = {**args, "classifier": [f"sstack={tmp_path / 'clf'}"], "detector": None}
    assert isinstance(serve_mod.app(local), Application)
    with pytest.raises(ValueError, match="min ≤ max"):
        serve_mod.app({**local, "min_replicas": 3, "max_replicas": 2})


def test_ray_job_submit_deploys_the_online_service_which_outlives_the_job(ray_head, small_corpus, tmp_path):
    import urllib.request

    ray_bin, address, env = ray_head
    src, rows = small_corpus
    torch.manual_seed(0)
    models.save_artifact(
        tmp_path / "clf",
        models.build_classifier("compact_cnn", 4, image_size=32).state_dict(),
        {
            "kind": "classifier",
            "architecture": "compact_cnn",
            "classes": ["1", "2", "3", "4"],
            "stack": "sstack",
            "data": {"size": 32, "channels": 3},
        },
    )
    port = _free_port()
    runtime_env = json.dumps({"excludes": ["tests/", "quickstart-out/", ".git/", ".venv/"]})
    submit = [
        *(ray_bin, "job", "submit", "--address", address, "--working-dir", str(ROOT)),
        *("--runtime-env-json", runtime_env, "--", sys.executable, "jobs/serve.py"),
        *("--classifier", str(tmp_path / "clf"), "--port", str(port), "--cpus-per-replica", "0.5"),
    ]
    res = submit_job(submit, env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"page: http://127.0.0.1:{port}/" in res.stdout
    image = (src / next(r for r in rows if r["stack"] == "sstack")["image"]).read_bytes()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/predict", data=image, method="POST")
    with urllib.request.urlopen(req, timeout=60) as r:  # the job has ended; the application serves on
        answer = json.loads(r.read())
    assert answer["stack"] == "sstack" and answer["band"] in ("0-40%", "40-60%", "60-80%", "80-100%")
    serve_bin = str(Path(sys.executable).with_name("serve"))
    down = subprocess.run([serve_bin, "shutdown", "-a", address, "-y"], capture_output=True, text=True, env=env)
    assert down.returncode == 0, down.stderr[-2000:]
