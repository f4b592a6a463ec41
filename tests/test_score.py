from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pytest
import torch

from msc_ray import metrics, models, score


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """Real (untrained) classifiers, one per stack, and a detector: scoring is under test, not accuracy."""
    root = tmp_path_factory.mktemp("artifacts")
    torch.manual_seed(0)
    for name, arch, stack, size, equalize, temperature in (
        ("clf", "mobilenet_v3_small", "sstack", 64, False, 1.5),
        ("clf_m", "compact_cnn", "mstack", 48, True, 1.0),
    ):
        models.save_artifact(
            root / name,
            models.build_classifier(arch, 4, image_size=size).state_dict(),
            {
                "kind": "classifier",
                "architecture": arch,
                "classes": ["1", "2", "3", "4"],
                "stack": stack,
                "data": {"size": size, "channels": 3, "equalize": equalize},
                "dropout": 0.5,
                "temperature": temperature,
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
    return (f"sstack={root / 'clf'}", f"mstack={root / 'clf_m'}"), root / "det"


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
    cfg = score.ScoreConfig(archive=str(root), classifier=clf, detector=str(det), out=out, chunk_size=20)
    s = score.score_archive(cfg)
    versions = {e.split("=")[0]: models.read_config(e.split("=", 1)[1])["version"] for e in clf}
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
        # each image went through its own stack's classifier (and input size), the detector through sstack only
        assert r["classifier_version"] == versions[r["stack"]] and r["run_id"] == s.run_id
        assert (r["detector_version"] is not None) == (r["stack"] == "sstack")
    # a rerun adds nothing; a new object adds exactly its row
    again = score.score_archive(cfg)
    assert again.scored == 0 and again.skipped == n_images
    shutil.copyfile(root / t[0]["key"], root / "sstack" / "3" / "S777_d09_tl.png")
    third = score.score_archive(cfg)
    assert third.scored == 1 and len(score.read_report(out)) == n_images + 1
    # a new single-stack model version scores those images again, as new rows; with no multi-stack
    # classifier given, every multi-stack image is an error row naming the missing stack
    sstack_art = clf[0].split("=", 1)[1]
    models.save_artifact(
        tmp_path / "clf2",
        {k: v + 0.01 if v.is_floating_point() else v for k, v in models.read_artifact(sstack_art)[1].items()},
        {k: v for k, v in models.read_artifact(sstack_art)[0].items() if k not in ("version", "format")},
    )
    fourth = score.score_archive(score.ScoreConfig(archive=str(root), classifier=str(tmp_path / "clf2"), out=out))
    assert fourth.scored == n_images + 1
    new = [r for r in score.read_report(out).to_pylist() if r["run_id"] == fourth.run_id]
    m_rows = [r for r in new if r["stack"] == "mstack"]
    assert m_rows and all(r["status"] == "error" and r["error_kind"] == "permanent" for r in m_rows)
    missing = "no classifier for stack mstack (give --classifier mstack=ARTIFACT)"
    assert all(r["error"].endswith(missing) for r in m_rows)
    new_version = models.read_config(tmp_path / "clf2")["version"]
    assert {r["classifier_version"] for r in new if r["stack"] == "sstack"} == {new_version}


def test_other_test_time_views_are_a_new_computation_scored_once(ray_session, archive, artifacts, tmp_path):
    """These artifacts were saved without views (one). ``views=1`` is theirs: nothing new to score.
    ``views=8`` is another computation: every image again, once, its version saying so, with other
    probabilities (an untrained network reads a turned image a little differently; its weights doubled
    make that show)."""
    root, n_images = archive
    clf_s, clf_m = artifacts[0]
    config = models.read_config(clf_s.split("=", 1)[1])
    keep = {k: v for k, v in config.items() if k not in ("version", "format")}
    torch.manual_seed(0)
    net = models.build_classifier("compact_cnn", 4, image_size=64)
    state = {k: v * 2 if v.dim() > 1 else v for k, v in net.state_dict().items()}
    models.save_artifact(tmp_path / "sharp", state, {**keep, "architecture": "compact_cnn", "temperature": 1.0})
    clf = (f"sstack={tmp_path / 'sharp'}", clf_m)
    out = str(tmp_path / "report")
    first = score.score_archive(score.ScoreConfig(archive=str(root), classifier=clf, out=out))
    assert first.scored == n_images
    same = score.score_archive(score.ScoreConfig(archive=str(root), classifier=clf, out=out, views=1))
    assert same.scored == 0 and same.skipped == n_images
    eight = score.ScoreConfig(archive=str(root), classifier=clf, out=out, views=8)
    s8 = score.score_archive(eight)
    assert s8.scored == n_images and score.score_archive(eight).scored == 0
    rows = score.read_report(out).to_pylist()
    versions = {e.split("=")[0]: models.read_config(e.split("=", 1)[1])["version"] for e in clf}
    by_run = {
        run: {r["uri"]: r for r in rows if r["run_id"] == run and r["status"] == "ok"}
        for run in (first.run_id, s8.run_id)
    }
    one, many = by_run[first.run_id], by_run[s8.run_id]
    assert one.keys() == many.keys() and len(one) == n_images - 2
    for uri, r in many.items():
        assert r["classifier_version"] == versions[r["stack"]] + "+views8"
        assert one[uri]["classifier_version"] == versions[r["stack"]]
        assert sum(r["probabilities"]) == pytest.approx(1.0, abs=1e-4)
    sharp = [u for u in one if one[u]["stack"] == "sstack"]
    diff = [np.abs(np.subtract(many[u]["probabilities"], one[u]["probabilities"])).max() for u in sharp]
    assert np.median(diff) > 1e-3, diff
    with pytest.raises(ValueError, match="--views 3"):
        score.ScoreConfig(archive=str(root), classifier=clf, out=out, views=3).validate()


def _clf_args(clf) -> list[str]:
    return [a for entry in clf for a in ("--classifier", entry)]


def _published(client, bucket: str, prefix: str) -> list[str]:
    """The published parts (the commit is a part's arrival in parts/, after its manifest), not the
    directory marker pyarrow writes when it creates ``parts/``."""
    resp = client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/parts/")
    return [o["Key"] for o in resp.get("Contents", []) if o["Key"].endswith(".parquet")]


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
        *_clf_args(clf),
        "--out",
        "s3://plant/reports/qc",
        "--chunk-size",
        "5",
        "--address",
        ray_session.get_runtime_context().gcs_address,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while not _published(client, "plant", "reports/qc") and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    proc.send_signal(signal.SIGKILL)  # killed half-way: no clean-up of any kind
    proc.wait()
    kept = _published(client, "plant", "reports/qc")
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
    base = [*_clf_args(clf), "--out", "s3://failures/report"]
    wrong = "WRONG" + "x" * 30
    _fails_fast(["s3://failures/in", *base], {"AWS_SECRET_ACCESS_KEY": wrong}, "s3://failures", secret=wrong)
    _fails_fast(
        ["s3://no-such-bucket/in", *_clf_args(clf), "--out", str(tmp_path / "r")],
        {},
        "no-such-bucket",
    )
    _fails_fast(["s3://failures/in", *base, "--endpoint-url", "http://127.0.0.1:9"], {}, "s3://failures")
    assert client.list_objects_v2(Bucket="failures", Prefix="report").get("KeyCount", 0) == 0
    assert not (tmp_path / "r" / "_commits").exists()


def test_report_command_counts_and_plots_beside_a_report_plain_readers_read(ray_session, archive, artifacts, tmp_path):
    import pandas as pd

    root, n_images = archive
    clf, _ = artifacts
    out = tmp_path / "report"
    score.score_archive(score.ScoreConfig(archive=str(root), classifier=clf, out=str(out)))
    res = subprocess.run([sys.executable, "-m", "msc_ray.cli", "report", str(out)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert f"{n_images} rows" in res.stdout and "error=2" in res.stdout and "sstack=" in res.stdout
    plots = tmp_path / "report-plots"  # beside the report, not inside it
    assert (plots / "bands.png").stat().st_size > 5000
    assert (plots / "vessels.png").stat().st_size > 5000
    assert sorted(p.name for p in out.iterdir()) == ["_commits", "_leases", "_staging", "parts"]
    assert not list((out / "_leases").iterdir())  # the run's lease is gone with it
    # a plain Parquet reader of the report folder reads it untouched: one row per object
    assert len(pd.read_parquet(out)) == n_images
    missing = subprocess.run(
        [sys.executable, "-m", "msc_ray.cli", "report", str(tmp_path / "none")], capture_output=True, text=True
    )
    assert missing.returncode == 1 and "no such report folder" in missing.stderr
    (tmp_path / "empty").mkdir()
    empty = subprocess.run(
        [sys.executable, "-m", "msc_ray.cli", "report", str(tmp_path / "empty")], capture_output=True, text=True
    )
    assert empty.returncode == 1 and "no committed rows" in empty.stderr


def test_report_of_a_missing_bucket_names_the_bucket(s3_server):
    res = subprocess.run(
        [sys.executable, "-m", "msc_ray.cli", "report", "s3://no-such-bucket/qc"], capture_output=True, text=True
    )
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and len(lines) == 1 and "no-such-bucket" in lines[0], res.stderr


def test_a_run_id_is_a_new_name_never_a_path(ray_session, archive, artifacts, tmp_path):
    root, _ = archive
    clf, _ = artifacts
    out = tmp_path / "r"
    for bad in ("../../x", "a/b", ".hidden", "x" * 200):
        with pytest.raises(ValueError, match="--run-id"):
            score.score_archive(score.ScoreConfig(archive=str(root), classifier=clf, out=str(out), run_id=bad))
    assert not (tmp_path / "x").exists() and not out.exists()
    first = score.score_archive(score.ScoreConfig(archive=str(root), classifier=clf, out=str(out), run_id="day-1"))
    assert first.scored > 0
    before = {p.name: p.stat().st_mtime_ns for p in (out / "parts").iterdir()}
    with pytest.raises(ValueError, match="already used"):
        score.score_archive(score.ScoreConfig(archive=str(root), classifier=clf, out=str(out), run_id="day-1"))
    assert {p.name: p.stat().st_mtime_ns for p in (out / "parts").iterdir()} == before


def test_killed_between_manifest_and_part_no_reader_sees_the_part(
    ray_session, archive, artifacts, tmp_path, monkeypatch
):
    """The commit step: a run that dies after writing a chunk's manifest but before moving the part
    into parts/ leaves nothing a plain Parquet reader would read, and the rerun scores those objects."""
    import pandas as pd

    root, n_images = archive
    clf, _ = artifacts
    out = tmp_path / "r"
    real_commit = score.commit._commit_part
    done = []

    def dying_commit(loc, staging, final):
        if len(done) == 1:
            raise KeyboardInterrupt("killed between the manifest and the part")
        real_commit(loc, staging, final)
        done.append(final)

    monkeypatch.setattr(score.commit, "_commit_part", dying_commit)
    cfg = score.ScoreConfig(archive=str(root), classifier=clf, out=str(out), chunk_size=5)
    with pytest.raises(KeyboardInterrupt):
        score.score_archive(cfg)
    monkeypatch.setattr(score.commit, "_commit_part", real_commit)
    assert len(list((out / "_commits").glob("*.json"))) == 2  # the second chunk's manifest was written
    assert len(list((out / "parts").glob("*.parquet"))) == 1  # but only the first part published
    assert len(pd.read_parquet(out)) == 5 and score.read_report(str(out)).num_rows == 5
    again = score.score_archive(cfg)
    assert again.skipped == 5 and again.scored == n_images - 5
    t = pd.read_parquet(out)
    assert len(t) == n_images and t["uri"].nunique() == n_images
    assert score.read_report(str(out)).num_rows == n_images


def _odd_images(folder) -> list[str]:
    """Two images unlike the corpus: a colour one and one of another size (so a block holds mixed sizes)."""
    from PIL import Image

    src = sorted(folder.rglob("S0*.png"))[0]
    gray = np.asarray(Image.open(src))
    rgb = np.stack([gray, (gray * 0.8).astype(np.uint8), np.flipud(gray)], -1)
    out = [folder / "sstack" / "1" / "S500_d02_c.png", folder / "sstack" / "1" / "S501_d02_c.png"]
    Image.fromarray(rgb).save(out[0])
    Image.fromarray(gray[3:, : gray.shape[1] - 9]).save(out[1])
    return [str(p) for p in out]


def test_scored_images_reach_the_model_as_its_validation_images_did(small_corpus, tmp_path):
    """Scoring decodes to uint8 and fits each image to a model's input — channels, equalisation,
    resize — with the training cache's own steps: in a decode task, or on the model actor for
    full-size images of mixed sizes, the result is the cached image, value for value, and the
    normalised input is what the evaluation augmenter makes of the cached one."""
    from msc_ray import data, engine, inference
    from msc_ray.config import DataConfig, to_dict

    src, rows = small_corpus
    folder = tmp_path / "imgs"
    shutil.copytree(src / "sstack", folder / "sstack")
    uris = [str(src / r["image"]) for r in rows if r["stack"] == "mstack"][:3] + sorted(
        str(p) for p in (folder / "sstack").rglob("*.png")
    )[:3]
    uris += _odd_images(folder)
    n = len(uris)
    batch = {
        "uri": np.array(uris),
        "key": np.array(uris),
        "path": np.array(uris),
        "row": np.arange(n),
        "stack": np.array(["sstack"] * n),
    }
    cpu = torch.device("cpu")
    for cfg in (
        DataConfig(size=48, channels=3),
        DataConfig(size=32, channels=3, equalize=True),
        DataConfig(size=40, channels=1, equalize=True),  # the colour image averaged to one channel
    ):
        cache = data._cache_batch(batch, cfg=cfg, detection=False)
        assert cache["ok"].all()
        kw = {"cls_cfgs": {"sstack": to_dict(cfg)}, "endpoint_url": None, "max_pixels": 10**8}
        in_tasks = score._preprocess(batch, **kw)
        fitted = in_tasks["image_sstack"]
        assert fitted.dtype == np.uint8 and np.array_equal(fitted, cache["image"])
        full = score._preprocess(batch, **kw, on_actor=True)
        assert full["image"].dtype == object and {a.shape[0] for a in full["image"]} == {3}  # mixed sizes
        assert full["shape"].tolist()[-1] == [64 - 3, 64 - 9] and full["shape"].tolist()[0] == [64, 64]
        prep = inference.ScoringInput(cfg, cpu)
        assert torch.equal(prep.fitted(full["image"]), torch.from_numpy(cache["image"]))
        x = prep(fitted)
        assert x.is_contiguous(memory_format=torch.channels_last)
        aug = engine.Augmenter(cfg, train=False)
        want = torch.stack([aug.one(img, "k", 0) for img in cache["image"]])
        assert torch.allclose(x, want, atol=1e-6)
        # one image on the online page's path: the same input
        one = inference.classifier_input(data.load_image(uris[-2], "x", DataConfig(channels=3)), cfg)
        assert np.allclose(one, want[-2].numpy(), atol=1e-6)


def test_images_fitted_on_the_actor_score_as_fitted_in_the_decode_tasks(ray_session, archive, artifacts, tmp_path):
    """``--preprocess-on actor`` (the GPU path: decode tasks ship full-size uint8 images; resize and
    equalisation happen on the model's device) gives the report that ``tasks`` gives, colour images,
    mixed sizes and broken files included. The decode tasks stay a Ray Data stage of their own (fused
    into the one model actor, they decoded serially while the other cores idled)."""
    root, n_images = archive
    _odd_images(root)
    clf, det = artifacts
    reports = {}
    for where in ("tasks", "actor"):
        # small decode blocks, larger model batches: a model batch joins blocks of different shapes
        # (gray, gray made colour beside a colour image, one array per row for mixed sizes)
        cfg = score.ScoreConfig(
            archive=str(root),
            classifier=clf,
            detector=str(det),
            out=str(tmp_path / where),
            preprocess_on=where,
            decode_batch=4,
            batch_size=16,
        )
        s = score.score_archive(cfg)
        assert (s.scored, s.errors) == (n_images + 2, 2)
        reports[where] = {r["key"]: r for r in score.read_report(cfg.out).to_pylist()}
    tasks, actor = reports["tasks"], reports["actor"]
    assert tasks.keys() == actor.keys()
    for key, r in tasks.items():
        a = actor[key]
        assert (a["status"], a["error"]) == (r["status"], r["error"])
        if r["status"] == "ok":
            assert np.allclose(a["probabilities"], r["probabilities"], atol=1e-5), key
            assert a["n_abnormal"] == r["n_abnormal"], key
            if r["abnormal_boxes"]:
                got = [[b[k] for k in ("x1", "y1", "x2", "y2", "score")] for b in a["abnormal_boxes"]]
                want = [[b[k] for k in ("x1", "y1", "x2", "y2", "score")] for b in r["abnormal_boxes"]]
                assert np.allclose(got, want, atol=0.02), key
    odd = tasks["sstack/1/S501_d02_c.png"]["abnormal_boxes"]
    assert odd and max(b["x2"] for b in odd) <= 64 - 9 + 0.5  # boxes in the image's own pixels
    # the plan: decode tasks, then the actor pool, as two operators — one execution for both stacks
    cfg = score.ScoreConfig(archive=str(root), classifier=clf, out=str(tmp_path / "plan"))
    sm = score._check_models(cfg)
    listed = [o for o in score.list_archive(str(root)) if o.key.endswith(".png") and "99" not in o.key]
    todo = [o for st in ("sstack/", "mstack/") for o in [o for o in listed if o.key.startswith(st)][:4]]
    stacks = [o.key.split("/")[0] for o in todo]
    ds = score._pipeline(cfg, todo, list(range(len(todo))), stacks, sm)
    out = ds.take_all()
    assert sorted(r["row"] for r in out) == list(range(8)) and all(r["ok"] for r in out)
    stats = ds.stats()
    assert "MapBatches(_preprocess):" in stats and stats.count("MapBatches(ModelActor):") == 1, stats


def test_the_gpu_number_formats_keep_probabilities_and_box_coordinates(small_corpus, tmp_path):
    """The GPU path's number formats, run on the CPU (bfloat16 weights and autocast work there too):
    a ResNet-18 with bfloat16 weights gives the float32 probabilities within 0.02 on real images; under
    bfloat16 autocast the detector's and the Mask R-CNN segmenter's boxes come back float32, where
    torchvision alone returns them in bfloat16 (2-pixel steps at 256–512 px)."""
    from msc_ray import data, inference
    from msc_ray.config import DataConfig

    src, rows = small_corpus
    torch.manual_seed(0)
    models.save_artifact(
        tmp_path / "r18",
        models.build_classifier("resnet18", 4, image_size=64).state_dict(),
        {
            "kind": "classifier",
            "architecture": "resnet18",
            "classes": ["1", "2", "3", "4"],
            "stack": "sstack",
            "data": {"size": 64, "channels": 3},
            "temperature": 0.02,  # sharp probabilities: a difference in the logits shows
        },
    )
    clf = inference.Classifier(str(tmp_path / "r18"), device=torch.device("cpu"))
    assert clf.views == 1  # an artifact without test-time views: the image as it is, as it was fitted
    imgs = [data.load_image(str(src / r["image"]), r["image"], DataConfig(channels=1)) for r in rows[:16]]
    x = np.stack([clf.prepare(i) for i in imgs])
    p32, _ = clf(x)
    p16, _ = clf.to_bfloat16()(x)
    assert next(clf.model.parameters()).dtype == torch.bfloat16 and p16.dtype == np.float32
    assert p32.max(1).mean() > 0.6  # not flat: the comparison means something
    assert np.abs(p16 - p32).max() < 0.02 and (p16.argmax(1) == p32.argmax(1)).mean() >= 0.9
    cpu = torch.device("cpu")
    batch = [torch.rand(3, 128, 128) for _ in range(2)]
    for build in (
        lambda: models.build_detector("resnet18_fpn", image_size=128, score_thresh=0.0),
        lambda: models.build_segmenter("compact_fpn", image_size=128, score_thresh=0.0),
    ):
        torch.manual_seed(1)
        plain = build().eval()
        assert inference._forward(plain, batch, cpu, amp=True)[0]["boxes"].dtype == torch.bfloat16
        torch.manual_seed(1)
        hooked = inference.float32_boxes(build().eval())
        out = inference._forward(hooked, batch, cpu, amp=True)
        assert all(len(o["boxes"]) and o["boxes"].dtype == o["scores"].dtype == torch.float32 for o in out)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_preprocessing_on_the_gpu_agrees_with_the_cpu(small_corpus):
    """The actor's GPU path (uint8 to the device, then channels, equalisation, resize, normalisation
    there) against the same steps on the CPU: within one grey level per pixel, 1e-3 on average."""
    from msc_ray import images, inference
    from msc_ray.config import DataConfig

    src, rows = small_corpus
    imgs = np.stack([images.decode_u8((src / r["image"]).read_bytes(), r["image"]) for r in rows[:12]])
    for cfg in (DataConfig(size=48), DataConfig(size=40, equalize=True), DataConfig(size=96, channels=1)):
        cpu = inference.ScoringInput(cfg, torch.device("cpu"))
        gpu = inference.ScoringInput(cfg, torch.device("cuda"))
        a, b = cpu.fitted(imgs).float() / 255, gpu.fitted(imgs).cpu().float() / 255
        assert (a - b).abs().max() <= 1 / 255 + 1e-6 and (a - b).abs().mean() <= 1e-3
        std = min(cfg.norm_std)
        assert (cpu(imgs) - gpu(imgs).cpu()).abs().mean() <= 1e-3 / std


def test_model_actors_and_batch_follow_the_cluster_unless_set():
    base = {"archive": "a", "classifier": "c", "out": "o"}
    plan = score.ScoreConfig(**base).actor_plan
    assert plan({"CPU": 16.0}) == (12, 32) and plan({"CPU": 4.0}) == (3, 32)  # a quarter of the cores decodes
    assert plan({"CPU": 2.0}) == (2, 32) and plan({"CPU": 1.0}) == (1, 32)  # under four, every core runs a model
    shares = score.ScoreConfig(**base).cpu_shares
    assert shares({"CPU": 16.0}, 12) == (1.0, 1.0) and shares({"CPU": 4.0}, 3) == (1.0, 1.0)
    # no core left beside the actors: actors and a decode task share the cores, and never hold them all
    for cpus, actors in ((1.0, 1), (2.0, 2), (3.0, 3), (4.0, 4), (2.0, 5)):
        actor, decode = shares({"CPU": cpus}, actors)
        assert actor == decode < 1 and actors * actor + decode <= cpus and actors * actor + decode > 0.99 * cpus
    assert score.ScoreConfig(**base, gpus_per_actor=1).cpu_shares({"CPU": 2.0, "GPU": 2.0}, 2) == (0.0, 1.0)
    # several nodes (three of one core): a core is kept for decoding, and --concurrency that leaves none is refused
    assert plan({"CPU": 3.0}, 3) == (2, 32) and shares({"CPU": 3.0}, 2, 3) == (1.0, 1.0)
    with pytest.raises(ValueError, match=r"^--concurrency 3: .* at most 2$"):
        score.ScoreConfig(**base, concurrency=3).cpu_shares({"CPU": 3.0}, 3, 3)
    gpu = score.ScoreConfig(**base, gpus_per_actor=1).actor_plan
    assert gpu({"CPU": 16.0, "GPU": 4.0}) == (4, 256)
    assert score.ScoreConfig(**base, gpus_per_actor=0.5).actor_plan({"CPU": 16.0, "GPU": 2.0}) == (4, 256)
    assert score.ScoreConfig(**base, concurrency=3, batch_size=8).actor_plan({"CPU": 16.0}) == (3, 8)
    assert score.ScoreConfig(**base).fits_on_actor is False
    assert score.ScoreConfig(**base, gpus_per_actor=1).fits_on_actor is True
    assert score.ScoreConfig(**base, gpus_per_actor=1, preprocess_on="tasks").fits_on_actor is False
    for bad, msg in (({"concurrency": -1}, "--concurrency"), ({"preprocess_on": "gpu"}, "--preprocess-on")):
        with pytest.raises(ValueError, match=msg):
            score.ScoreConfig(**base, **bad).validate()


def test_a_one_core_cluster_scores_the_archive(archive, artifacts, tmp_path):
    """On one core a model actor holding it left no core for the decode tasks it waits on: the run
    never ended. The actor and the decoding now share the core."""
    root, n_images = archive
    clf, _ = artifacts
    code = (
        "import ray, sys\n"
        "from msc_ray import score\n"
        "ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)\n"
        f"s = score.score_archive(score.ScoreConfig(archive={str(root)!r}, classifier={list(clf)!r}, "
        f"out={str(tmp_path / 'report')!r}))\n"
        "print('scored', s.scored, s.errors)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"scored {n_images} 2" in res.stdout
    assert len(score.read_report(str(tmp_path / "report"))) == n_images


def _read_block(uris: list[str], endpoint_url: str | None, read_attempts: int) -> dict:
    """The read/decode task on one block of single-stack objects keyed by their file names."""
    batch = {
        "row": np.arange(len(uris)),
        "uri": np.array(uris),
        "key": np.array([u.rsplit("/", 1)[-1] for u in uris]),
        "stack": np.array(["sstack"] * len(uris)),
    }
    return score._preprocess(
        batch,
        cls_cfgs={"sstack": {"size": 64, "channels": 3}},
        endpoint_url=endpoint_url,
        max_pixels=10**8,
        read_attempts=read_attempts,
        retry_delay=0.01,
    )


def test_store_errors_are_retried_then_transient_corrupt_images_permanent(artifacts, archive, monkeypatch):
    """The read/decode task on its own: a store error is retried with backoff; one that persists is a
    transient row (and the rest of the block gets one try: no retry storm); a corrupt image or a
    vanished object is permanent and not retried."""
    root, _ = archive
    good = sorted(str(p) for p in (root / "sstack").rglob("S0*.png"))[:4]
    corrupt = str(root / "sstack" / "1" / "S999_d03_c.png")
    calls: dict[str, int] = {}
    from msc_ray import data

    real = data.read_uri

    def flaky(uri, endpoint_url, max_attempts=3):
        assert max_attempts == 1  # the task's tries are the only ones
        calls[uri] = calls.get(uri, 0) + 1
        if uri == good[0] and calls[uri] < 3:
            raise OSError("SlowDown: please reduce your request rate")
        if uri in (good[1], good[3]):
            raise OSError("NETWORK_CONNECTION during GetObject")
        if uri == good[2]:
            raise FileNotFoundError(uri)
        return real(uri, endpoint_url, max_attempts)

    monkeypatch.setattr(data, "read_uri", flaky)
    out = _read_block([good[0], good[1], corrupt, good[2], good[3]], None, read_attempts=3)
    assert out["ok"].tolist() == [True, False, False, False, False]
    assert out["transient"].tolist() == [False, True, False, False, True]
    assert calls[good[0]] == 3 and calls[good[1]] == 3  # retried up to the limit
    assert calls[corrupt] == 1 and calls[good[2]] == 1  # permanent: one try
    assert calls[good[3]] == 1  # after one object used up its retries: one try each
    assert "cannot read" in out["error"][1] and "cannot read" in out["error"][3]


def test_a_failing_store_gets_one_request_per_try(tmp_path):
    """A store that answers 503 to everything: reading an object with two tries sends two requests
    (the SDK's own retries are off there; on, they were three per try, each after a 1–2 s backoff),
    and the error is transient, named by its key."""
    import http.server
    import threading

    requests: list[str] = []

    class Busy(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            requests.append(f"{self.command} {self.path}")
            body = b"<Error><Code>SlowDown</Code><Message>reduce your request rate</Message></Error>"
            self.send_response(503)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_HEAD = _answer

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Busy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        out = _read_block(["s3://plant/cap/a.png", "s3://plant/cap/b.png"], endpoint, read_attempts=2)
    finally:
        server.shutdown()
    assert out["ok"].tolist() == [False, False] and out["transient"].tolist() == [True, True]
    assert out["error"][0].startswith("a.png: cannot read") and out["error"][1].startswith("b.png: cannot read")
    # two tries for a.png, then one for b.png (the block saw the store fail)
    assert len(requests) == 3 and all(r.endswith(("/plant/cap/a.png", "/plant/cap/b.png")) for r in requests)
    assert sum(r.endswith("a.png") for r in requests) == 2


def test_store_outage_rows_are_transient_and_the_next_run_scores_them(
    ray_session, s3_server, archive, artifacts, tmp_path
):
    """The store dies after the listing: every read fails, the rows are committed as transient
    errors; the next run (the store back on its own folder, killed at the outage after a short
    grace) scores exactly those objects and the report holds one current row per object."""

    from msc_ray.s3local import LocalS3

    root, n_images = archive
    clf, _ = artifacts
    doomed = LocalS3(tmp_path / "s3b", s3_server.access_key, s3_server.secret_key).start()
    try:
        _outage_then_recovery(doomed, root, n_images, clf, tmp_path)
    finally:
        doomed.stop()


def _outage_then_recovery(doomed, root, n_images, clf, tmp_path):
    import pandas as pd

    from tests.conftest import upload_dir

    c = doomed.client()
    c.create_bucket(Bucket="outage")
    upload_dir(c, root, "outage", "cap")
    out = tmp_path / "rep"
    first = score.score_archive(
        score.ScoreConfig(
            archive="s3://outage/cap",
            classifier=clf,
            out=str(out),
            endpoint_url=doomed.endpoint,
            read_attempts=2,
            retry_delay=0.05,
        ),
        connect=doomed.stop,  # listed, then the store is gone
    )
    t = score.read_report(str(out)).to_pylist()
    assert first.scored == n_images and len(t) == n_images
    assert {r["error_kind"] for r in t} == {"transient"} and all(r["status"] == "error" for r in t)
    doomed.start()  # back on the same folder (new ports): every object it stored is there
    second = score.score_archive(
        score.ScoreConfig(archive="s3://outage/cap", classifier=clf, out=str(out), endpoint_url=doomed.endpoint)
    )
    assert second.skipped == 0 and second.scored == n_images
    t = score.read_report(str(out)).to_pylist()
    assert len(t) == n_images and len({r["uri"] for r in t}) == n_images
    assert sorted(r["key"] for r in t if r["status"] == "error") == [
        "mstack/2/M999_d01_c.png",
        "sstack/1/S999_d03_c.png",
    ]
    assert {r["error_kind"] for r in t if r["status"] == "error"} == {"permanent"}
    plain = pd.read_parquet(out)  # history stays in the files: a plain reader filters transient rows
    assert len(plain) == 2 * n_images and len(plain[plain.error_kind != "transient"]) == n_images
    third = score.score_archive(
        score.ScoreConfig(archive="s3://outage/cap", classifier=clf, out=str(out), endpoint_url=doomed.endpoint)
    )
    assert third.scored == 0 and third.skipped == n_images


def test_vessel_day_position_from_a_pattern_or_a_metadata_table(ray_session, small_corpus, artifacts, tmp_path):
    """An archive laid out as plants name it (vessel-00/day-3/centre.png) gets its vessel, day and
    position from --key-pattern or --metadata; without either, the rows say how many got no vessel."""
    import pyarrow.csv as pacsv

    src, rows = small_corpus
    clf, _ = artifacts
    root = tmp_path / "plant"
    expect = {}
    for i, r in enumerate(r for r in rows if r["stack"] == "sstack"):
        key = f"sstack/vessel-{i // 4:02d}/day-{i % 4 + 1}/pos{i}.png"
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / r["image"], root / key)
        expect[key] = (f"{i // 4:02d}", i % 4 + 1, f"pos{i}")
    plain = score.score_archive(score.ScoreConfig(archive=str(root), classifier=clf, out=str(tmp_path / "a")))
    assert plain.no_vessel == len(expect)
    pattern = r"vessel-(?P<vessel>\d+)/day-(?P<day>\d+)/(?P<position>\w+)\.png"
    by_pattern = score.score_archive(
        score.ScoreConfig(archive=str(root), classifier=clf, out=str(tmp_path / "b"), key_pattern=pattern)
    )
    assert by_pattern.no_vessel == 0
    got = {r["key"]: (r["vessel"], r["day"], r["position"]) for r in score.read_report(str(tmp_path / "b")).to_pylist()}
    assert got == expect
    table = pa.table(
        {
            "key": list(expect),
            "vessel": [f"V{v}" for v, _, _ in expect.values()],
            "day": [d for _, d, _ in expect.values()],
            "position": ["c"] * len(expect),
        }
    )
    pacsv.write_csv(table, tmp_path / "meta.csv")
    score.score_archive(
        score.ScoreConfig(
            archive=str(root), classifier=clf, out=str(tmp_path / "c"), metadata=str(tmp_path / "meta.csv")
        )
    )
    got = {r["key"]: (r["vessel"], r["day"], r["position"]) for r in score.read_report(str(tmp_path / "c")).to_pylist()}
    assert got == {k: (f"V{v}", d, "c") for k, (v, d, _) in expect.items()}
    with pytest.raises(ValueError, match="--key-pattern.*vessel"):
        score.ScoreConfig(archive=str(root), classifier=clf, out="x", key_pattern=r"day-(?P<day>\d+)").validate()
    with pytest.raises(ValueError, match="--key-pattern"):
        score.ScoreConfig(archive=str(root), classifier=clf, out="x", key_pattern="(unclosed").validate()
    (tmp_path / "bad.csv").write_text("name,vessel\na,b\n")
    with pytest.raises(ValueError, match="--metadata .*bad.csv"):
        score.score_archive(
            score.ScoreConfig(
                archive=str(root), classifier=clf, out=str(tmp_path / "d"), metadata=str(tmp_path / "bad.csv")
            )
        )


def test_dangling_links_and_link_loops_in_a_local_archive_are_error_rows(ray_session, archive, artifacts, tmp_path):
    root, n_images = archive
    clf, _ = artifacts
    os.symlink(root / "sstack" / "no-such.png", root / "sstack" / "S990_d01_c.png")  # dangling
    os.symlink(root / "sstack" / "S991_d01_c.png", root / "sstack" / "S991_d01_c.png")  # a loop
    s = score.score_archive(score.ScoreConfig(archive=str(root), classifier=clf, out=str(tmp_path / "r")))
    assert s.scored == n_images + 2
    rows = {r["key"]: r for r in score.read_report(str(tmp_path / "r")).to_pylist()}
    for key in ("sstack/S990_d01_c.png", "sstack/S991_d01_c.png"):
        assert rows[key]["status"] == "error" and rows[key]["error_kind"] == "permanent", rows[key]
        assert rows[key]["error"].startswith(f"{key}: cannot read")
    again = score.score_archive(score.ScoreConfig(archive=str(root), classifier=clf, out=str(tmp_path / "r")))
    assert again.scored == 0  # permanent: not scored again


def test_one_classifier_per_stack_checked_before_any_work(artifacts, tmp_path):
    clf, _ = artifacts
    s_art, m_art = (e.split("=", 1)[1] for e in clf)
    cfg = score.ScoreConfig(archive=str(tmp_path), classifier=(s_art, f"mstack={m_art}"), out=str(tmp_path / "r"))
    sm = score._check_models(cfg)  # a bare artifact serves the stack it was trained on
    assert {s: uri for s, (uri, _) in sm.classifiers.items()} == {"sstack": s_art, "mstack": m_art}
    assert sm.versions("mstack")[0] == models.read_config(m_art)["version"] and sm.versions("mstack")[1] == ""
    assert sm.missing("a.png", None).startswith("a.png: stack unknown")
    bad = {
        (f"sstack={s_art}", s_art): "two classifiers for sstack",
        (f"mstack={s_art}",): "trained on sstack images, not mstack",
        (f"tstack={s_art}",): "unknown stack 'tstack'",
    }
    for spec, message in bad.items():
        with pytest.raises(ValueError, match=message):
            score._check_models(score.ScoreConfig(archive=str(tmp_path), classifier=spec, out="r"))


def test_keys_without_a_stack_folder_need_one_classifier_or_stack(ray_session, small_corpus, artifacts, tmp_path):
    """A flat archive scored with two classifiers cannot tell the stack: error rows that say so; with
    ``--stack`` every image goes through that stack's model."""
    src, rows = small_corpus
    root = tmp_path / "flat"
    root.mkdir()
    for r in rows[:4]:
        shutil.copyfile(src / r["image"], root / r["image"].rsplit("/", 1)[-1])
    clf, _ = artifacts
    first = score.score_archive(score.ScoreConfig(archive=str(root), classifier=clf, out=str(tmp_path / "a")))
    t = score.read_report(str(tmp_path / "a")).to_pylist()
    assert first.errors == 4 and all("stack unknown" in r["error"] and r["stack"] is None for r in t)
    forced = score.score_archive(
        score.ScoreConfig(archive=str(root), classifier=clf, out=str(tmp_path / "b"), stack="mstack")
    )
    t = score.read_report(str(tmp_path / "b")).to_pylist()
    assert forced.errors == 0 and {r["stack"] for r in t} == {"mstack"}
    assert {r["classifier_version"] for r in t} == {models.read_config(clf[1].split("=", 1)[1])["version"]}


def test_a_second_run_on_a_report_being_written_stops_at_start(ray_session, archive, artifacts, tmp_path):
    """One writer per report: a live run's lease refuses a second run in one line, before it scores
    anything; two runs that claim the report at the same moment end with exactly one writer; the lease
    of a run that died stops counting."""
    root, n_images = archive
    clf, _ = artifacts
    out = str(tmp_path / "report")
    running = score.ReportLease(out, "night-run").acquire()  # a run in progress (this live process)
    with pytest.raises(ValueError, match=r"being written by run night-run \(host "):
        score.score_archive(score.ScoreConfig(archive=str(root), classifier=clf, out=out, run_id="second"))
    assert score.read_report(out).num_rows == 0 and not os.path.exists(os.path.join(out, "_leases", "second.json"))
    running.release()
    # two runs claim the report together: both write their lease, then both look; the earlier wins
    a, b = score.ReportLease(out, "a"), score.ReportLease(out, "b")
    a.write()
    b.write()
    a.check()
    with pytest.raises(ValueError, match="being written by run a"):
        b.check()
    a.release()
    # a lease whose process is gone (a killed run on this host) or that was not renewed lets the next run in
    dead = score.ReportLease(out, "killed")
    dead.pid = 2**22 + 12345  # no such process
    dead.write()
    silent = {"run_id": "silent", "host": "another-host", "pid": 1, "started": 1.0, "renewed": 1.0}
    (tmp_path / "report" / "_leases" / "silent.json").write_text(json.dumps(silent))  # renewed long ago
    s = score.score_archive(score.ScoreConfig(archive=str(root), classifier=clf, out=out, run_id="next"))
    assert s.scored == n_images and score.read_report(out).num_rows == n_images
    assert sorted(os.listdir(os.path.join(out, "_leases"))) == ["killed.json", "silent.json"]  # its own is gone


def test_the_archive_is_listed_planned_and_scored_a_window_at_a_time(ray_session, archive, artifacts, tmp_path):
    """The driver holds one window of the listing (and the report's 8-byte digests), never the whole
    archive: windows of 7 objects, parts of 3, numbered across windows; a rerun skips every object."""
    root, n_images = archive
    clf, _ = artifacts
    out = str(tmp_path / "report")
    cfg = score.ScoreConfig(archive=str(root), classifier=clf, out=out, window=7, chunk_size=3, run_id="w")
    s = score.score_archive(cfg)
    assert (s.listed, s.ignored, s.scored) == (n_images + 1, 1, n_images)
    windows = -(-n_images // 7)
    assert len(s.parts) == sum(-(-min(7, n_images - 7 * w) // 3) for w in range(windows))
    names = sorted(os.path.basename(p) for p in s.parts)
    assert names == [f"w-{i:05d}.parquet" for i in range(len(names))]
    t = score.read_report(out)
    assert t.num_rows == n_images and len(set(t.column("uri").to_pylist())) == n_images
    done = score.DoneKeys.load(out)
    assert len(done) == n_images
    row = t.slice(0, 1).to_pylist()[0]
    key = score.DoneKeys.digest(row["uri"], row["version"], row["classifier_version"], row["detector_version"] or "")
    assert done.contains(np.array([key, key ^ 1], np.uint64)).tolist() == [True, False]
    again = score.score_archive(score.ScoreConfig(archive=str(root), classifier=clf, out=out, window=7))
    assert (again.scored, again.skipped) == (0, n_images)


@pytest.fixture(scope="module")
def seg_artifacts(tmp_path_factory):
    """A real (untrained) Mask R-CNN segmenter whose masks fill their boxes (so it finds cells), and a
    LightGBM potency model of three morphology features."""
    import lightgbm as lgb

    from msc_ray import potency

    root = tmp_path_factory.mktemp("seg_artifacts")
    torch.manual_seed(0)
    state = models.build_segmenter("compact_fpn", image_size=64).state_dict()
    state["roi_heads.mask_predictor.mask_fcn_logits.bias"] += 3.0
    models.save_artifact(
        root / "seg",
        state,
        {
            "kind": "segmenter",
            "architecture": "compact_fpn",
            "classes": ["cell", "nucleus"],
            "image_size": 64,
            "score_thresholds": {"cell": 0.0, "nucleus": 0.0},
            "detections_per_img": 24,
            "stack": "sstack",
        },
    )
    rng = np.random.default_rng(0)
    feats = ["cell_count", "confluence_pct", "aspect_ratio_median"]
    x = rng.uniform(0, 50, (200, 3))
    booster = lgb.LGBMRegressor(n_estimators=20, verbose=-1).fit(x, x @ [1.0, 0.5, -2.0]).booster_
    potency.save_artifact(root / "pot", booster, {"kind": "potency", "features": feats, "target": "potency"})
    return root / "seg", root / "pot"


def test_segmenter_adds_morphology_and_cells_exactly_once_and_potency_per_vessel_day(
    ray_session, archive, artifacts, seg_artifacts, tmp_path, monkeypatch
):
    """Rows of the stack the segmenter serves gain cell count, mask confluence and morphology; their
    cells land in the per-cell table once, even across a run killed between a manifest and its part;
    the potency of every vessel-day is predicted from all its committed rows."""
    import pandas as pd

    from msc_ray import potency

    root, n_images = archive
    clf, _ = artifacts
    seg, pot = seg_artifacts
    out = tmp_path / "r"
    cfg = score.ScoreConfig(
        archive=str(root), classifier=clf, segmenter=str(seg), potency=str(pot), out=str(out), chunk_size=8
    )
    real_commit, done = score.commit._commit_part, []

    def dying_commit(loc, staging, final):
        if len(done) == 2:
            raise KeyboardInterrupt("killed between the manifest and the part")
        real_commit(loc, staging, final)
        done.append(final)

    monkeypatch.setattr(score.commit, "_commit_part", dying_commit)
    with pytest.raises(KeyboardInterrupt):
        score.score_archive(cfg)
    monkeypatch.setattr(score.commit, "_commit_part", real_commit)
    assert len(list((out / "_cells").glob("*.parquet"))) == 3  # the third part's cells were written ...
    assert score.read_cells(str(out))["uri"].unique().to_pylist()  # ... but only committed parts' are read
    assert set(score.read_cells(str(out))["uri"].to_pylist()) <= set(score.read_report(str(out))["uri"].to_pylist())
    s = score.score_archive(cfg)
    assert s.skipped == 16 and s.scored == n_images - 16 and s.potency_days > 0

    rows = score.read_report(str(out)).to_pandas()
    cells = score.read_cells(str(out)).to_pandas()
    assert len(rows) == n_images and rows["uri"].nunique() == n_images
    seg_version = models.read_config(seg)["version"]
    sst = rows[(rows["stack"] == "sstack") & (rows["status"] == "ok")]
    assert len(sst) == 24 and (sst["segmenter_version"] == seg_version).all()
    assert (sst["cell_count"] > 0).all() and sst["mask_confluence_pct"].between(0.1, 100).all()
    assert sst["aspect_ratio_median"].notna().all() and sst["flattened_share"].between(0, 1).all()
    assert rows.loc[rows["stack"] == "mstack", "segmenter_version"].isna().all()  # not the stack it serves
    others = rows[(rows["stack"] != "sstack") | (rows["status"] != "ok")]
    assert len(others) == n_images - 24 and others["cell_count"].isna().all()
    # every cell of every served row, once: the per-cell table agrees with each row's count
    per_row = cells.groupby("uri").size()
    assert per_row.reindex(sst["uri"]).fillna(0).astype(int).tolist() == sst["cell_count"].tolist()
    assert len(cells) == cells[["uri", "cell_id"]].drop_duplicates().shape[0] == sst["cell_count"].sum()
    assert (cells["area"] > 0).all() and (cells["segmenter_version"] == seg_version).all()
    assert (
        cells.merge(sst[["uri", "vessel", "day"]], on="uri", suffixes=("", "_row")).eval("vessel == vessel_row").all()
    )

    # potency per vessel-day: the model applied to the mean of the day's rows, every vessel-day once
    table = score.read_potency(str(out)).to_pandas()
    booster, pcfg = potency.load_potency(str(pot))
    feats = [score.MORPH_FIELDS[f] for f in pcfg["features"]]
    mean = sst.groupby(["vessel", "day"], as_index=False)[feats].mean()
    both = table.merge(mean, on=["vessel", "day"])
    assert len(table) == len(both) == len(mean) and table["n_images"].sum() == len(sst)
    assert both["potency"].to_numpy() == pytest.approx(booster.predict(both[feats].to_numpy()), rel=1e-4)
    # a plain Parquet reader of the report sees the rows only; a rerun adds no row and no cell
    assert len(pd.read_parquet(out)) == n_images
    again = score.score_archive(cfg)
    assert again.scored == 0 and again.cells == 0 and len(score.read_cells(str(out))) == len(cells)
    # the report command plots the morphology distributions and the potency per vessel over days
    from msc_ray import report

    summary, files = report.report(str(out), tmp_path / "plots")
    assert summary["cells"] == len(cells) and summary["potency"]["vessel_days"] == len(table)
    assert any(line.startswith("  predicted potency:") for line in report.lines(summary))
    assert {"morphology", "potency"} <= set(files) and all(os.path.getsize(f) > 10_000 for f in files.values())
    # a new classifier version scores the single-stack images again (new rows, their cells again);
    # a vessel-day's potency still counts each image once: its latest row
    sstack_art = clf[0].split("=", 1)[1]
    config, weights = models.read_artifact(sstack_art)
    models.save_artifact(
        tmp_path / "clf2",
        {k: v + 0.01 if v.is_floating_point() else v for k, v in weights.items()},
        {k: v for k, v in config.items() if k not in ("version", "format")},
    )
    newer = score.ScoreConfig(
        archive=str(root),
        classifier=(f"sstack={tmp_path / 'clf2'}", clf[1]),
        segmenter=str(seg),
        potency=str(pot),
        out=str(out),
    )
    fourth = score.score_archive(newer)
    assert fourth.scored == 25 and fourth.cells == len(cells)  # 24 images and the broken one
    assert len(score.read_report(str(out))) == n_images + 25
    assert score.read_potency(str(out))["n_images"].to_pylist() == table["n_images"].tolist()
    # a potency model needs the segmenter's morphology
    with pytest.raises(ValueError, match="--potency: .* needs --segmenter"):
        score.ScoreConfig(archive=str(root), classifier=clf, potency=str(pot), out=str(out)).validate()
