"""The online service: `msc-ray serve` as a user starts it (a subprocess on 127.0.0.1), its JSON API
through HTTP with good and bad uploads and concurrent clients, Ctrl-C, the page in a real headless
browser (Debian's chromium + chromedriver via Selenium), and the tune → serve path for a corpus of
other classes (neural-stem-cell fate, colour)."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from msc_ray import images, inference, models

sys.path.insert(0, str(Path(__file__).parent))
import fate  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 60):
    """(status, parsed JSON or text) — 4xx/5xx answers too."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw, ctype = r.status, r.read(), r.headers.get("content-type", "")
    except urllib.error.HTTPError as e:
        status, raw, ctype = e.code, e.read(), e.headers.get("content-type", "")
    return status, json.loads(raw) if "json" in ctype else raw.decode()


def multipart(name: str, data: bytes, field: str = "file") -> tuple[bytes, dict]:
    boundary = "msc-ray-test-boundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG")
    return buf.getvalue()


def start_server(args: list[str], log: Path, port: int, timeout: float = 240) -> subprocess.Popen:
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "msc_ray.cli", "serve", *args, "--port", str(port)],
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout
    while "page: http" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"msc-ray serve did not start:\n{log.read_text()[-3000:]}")
        time.sleep(1)
    return proc


def stop_server(proc: subprocess.Popen, timeout: float = 180) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


# --------------------------------------------------------------------------------------------------
# Fixtures: real (untrained) artifacts for both stacks and a detector; one server for the module
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-artifacts")
    torch.manual_seed(0)
    for name, stack, size, equalize in (("clf_s", "sstack", 64, False), ("clf_m", "mstack", 48, True)):
        models.save_artifact(
            root / name,
            models.build_classifier("compact_cnn", 4, image_size=size, extra_outputs=1).state_dict(),
            {
                "kind": "classifier",
                "architecture": "compact_cnn",
                "classes": ["1", "2", "3", "4"],
                "stack": stack,
                "data": {"size": size, "channels": 3, "equalize": equalize},
                "dropout": 0.5,
                "temperature": 1.3,
                "confluence_output": True,
            },
        )
    det = models.build_detector("compact_fpn", image_size=64)
    models.save_artifact(
        root / "det",
        det.state_dict(),
        {
            "kind": "detector",
            "architecture": "compact_fpn",
            "classes": ["Flatten"],
            "image_size": 64,
            "score_threshold": 0.0,  # untrained: keep every box, so that boxes appear
            "nms_iou": 0.5,
        },
    )
    return root


@pytest.fixture(scope="module")
def server(artifacts, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    port = free_port()
    args = [
        "--classifier",
        f"sstack={artifacts / 'clf_s'}",
        "--classifier",
        f"mstack={artifacts / 'clf_m'}",
        "--detector",
        str(artifacts / "det"),
        "--max-request-mb",
        "1",
        "--max-pixels",
        "1000000",
        "--max-batch-size",
        "8",
    ]
    proc = start_server(args, log, port)
    yield {"url": f"http://127.0.0.1:{port}/", "proc": proc, "log": log, "port": port}
    stop_server(proc)


@pytest.fixture(scope="module")
def sample(small_corpus):
    """One single-stack and one multi-stack image of the synthetic corpus (bytes)."""
    src, rows = small_corpus
    s = next(r for r in rows if r["stack"] == "sstack")
    m = next(r for r in rows if r["stack"] == "mstack")
    return (src / s["image"]).read_bytes(), (src / m["image"]).read_bytes()


# --------------------------------------------------------------------------------------------------
# The API
# --------------------------------------------------------------------------------------------------


def test_predict_answers_like_scoring_for_raw_and_multipart_uploads(server, artifacts, sample):
    s_bytes, m_bytes = sample
    status, raw = http("POST", server["url"] + "predict?stack=sstack&name=dish1.png", s_bytes)
    assert status == 200, raw
    body, headers = multipart("dish1.png", s_bytes)
    status, form = http("POST", server["url"] + "predict?stack=sstack", body, headers)
    assert status == 200, form
    # the same computation as archive scoring (msc_ray.inference), whichever way the image came
    clf = inference.Classifier(str(artifacts / "clf_s"), device=torch.device("cpu"))
    img = images.decode(s_bytes, "x")
    probs, reg = clf(clf.prepare(img)[None])
    want = inference.interpret(clf.classes, probs[0], float(reg[0]))
    for res in (raw, form):
        assert res["name"] == "dish1.png" and res["stack"] == "sstack"
        assert res["probabilities"] == pytest.approx(probs[0].tolist(), abs=1e-4)
        assert res["predicted_class"] == want["predicted_class"] and res["band"] == want["band"]
        assert res["confluence_pct"] == pytest.approx(want["confluence_pct"], abs=1e-3)
        lo, hi = (float(v) for v in res["band"].rstrip("%").split("-"))
        assert lo <= res["confluence_pct"] <= hi
        assert res["labels"] == ["0-40%", "40-60%", "60-80%", "80-100%"]
        assert res["models"]["classifier"] == clf.version and res["models"]["detector"]
        assert res["n_abnormal"] == len(res["abnormal_cells"]) > 0  # untrained detector at threshold 0
        b = res["abnormal_cells"][0]
        assert 0 <= b["x1"] < b["x2"] <= res["width"] + 1 and 0 <= b["y1"] < b["y2"] <= res["height"] + 1
        assert set(res["timing_ms"]) >= {"decode", "model", "total"}
    # the multi-stack classifier answers for mstack, without the single-stack detector
    status, res = http("POST", server["url"] + "predict?stack=mstack", m_bytes)
    assert status == 200 and res["stack"] == "mstack" and res["abnormal_cells"] is None


def test_sixteen_bit_tiff_and_rgba_are_read_like_the_archive(server, sample):
    import tifffile

    img = images.decode(sample[0], "x")  # (1, H, W) in [0, 1]
    g16 = (img[0] * 65535).round().astype(np.uint16)
    buf = io.BytesIO()
    tifffile.imwrite(buf, g16)
    status, tif = http("POST", server["url"] + "predict?stack=sstack&name=frame.tif&preview=1", buf.getvalue())
    assert status == 200, tif
    assert tif["preview"].startswith("data:image/png;base64,")  # a browser cannot show TIFF: the page uses this
    g8 = (img[0] * 255).round().astype(np.uint8)
    rgba = np.dstack([g8, g8, g8, np.full_like(g8, 128)])
    status, a = http("POST", server["url"] + "predict?stack=sstack", png(rgba, "RGBA"))
    status2, plain = http("POST", server["url"] + "predict?stack=sstack", png(g8))
    assert status == status2 == 200
    assert a["probabilities"] == pytest.approx(plain["probabilities"], abs=1e-4)  # alpha is dropped
    assert tif["probabilities"] == pytest.approx(plain["probabilities"], abs=2e-2)  # 16-bit vs 8-bit rounding


@pytest.mark.parametrize(
    "case,status,reason",
    [
        ("empty", 400, "empty"),
        ("text", 415, "not_an_image"),
        ("truncated", 400, "truncated"),
        ("pixels", 413, "too_many_pixels"),
        ("request", 413, "request_too_large"),
        ("form_without_file", 400, "no_file"),
        ("unknown_stack", 400, "unknown_stack"),
        ("no_stack", 400, "stack_needed"),
    ],
)
def test_bad_uploads_get_a_4xx_naming_the_reason_and_the_server_keeps_serving(server, sample, case, status, reason):
    url = server["url"] + "predict?stack=sstack&name=../../etc/" + case + ".png"
    body, headers = {
        "empty": (b"", {}),
        "text": (b"plate 4, day 3: looked fine\n", {}),
        "truncated": (sample[0][: len(sample[0]) // 2], {}),
        "pixels": (png(np.zeros((1001, 1000), np.uint8)), {}),
        "request": (os.urandom(1024 * 1024 + 1), {}),
        "form_without_file": (b"--b\r\nContent-Disposition: form-data; name=x\r\n\r\n1\r\n--b--\r\n", {}),
        "unknown_stack": (sample[0], {}),
        "no_stack": (sample[0], {}),
    }[case]
    if case == "form_without_file":
        headers = {"Content-Type": "multipart/form-data; boundary=b"}
    if case == "unknown_stack":
        url = url.replace("stack=sstack", "stack=../x")
    if case == "no_stack":
        url = url.replace("stack=sstack&", "")
    got, res = http("POST", url, body, headers)
    assert (got, res["reason"]) == (status, reason), res
    assert "\n" not in res["error"] and res["error"]
    if case in ("empty", "text", "truncated", "pixels"):
        assert res["error"].startswith(case + ".png: ")  # named, without the path the client sent
    assert not Path("/etc", case + ".png").exists()
    assert http("GET", server["url"] + "healthz")[0] == 200


def test_concurrent_requests_are_batched_and_all_answered(server, sample):
    def one(i):
        return http("POST", server["url"] + f"predict?stack=sstack&name=c{i}.png", sample[0])

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, range(32)))
    assert all(s == 200 for s, _ in answers)
    first = answers[0][1]["probabilities"]
    assert all(r["probabilities"] == pytest.approx(first, abs=1e-4) for _, r in answers)
    assert max(r["timing_ms"]["batch"] for _, r in answers) > 1  # @serve.batch put requests together


def test_models_and_health(server, artifacts):
    status, m = http("GET", server["url"] + "models")
    assert status == 200
    assert set(m["classifiers"]) == {"sstack", "mstack"}
    assert m["classifiers"]["sstack"]["config"]["data"]["size"] == 64
    assert m["classifiers"]["mstack"]["detector"] is False and m["classifiers"]["sstack"]["detector"] is True
    assert m["detector"]["config"]["architecture"] == "compact_fpn"
    assert m["limits"] == {"max_request_bytes": 1024 * 1024, "max_pixels": 1_000_000}
    status, h = http("GET", server["url"] + "healthz")
    assert status == 200 and h["status"] == "ok"


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="no chromium/chromedriver (scripts/test installs them)")
def test_page_in_a_real_browser_shows_band_boxes_and_errors(server, small_corpus, tmp_path):
    src, rows = small_corpus
    img = src / next(r for r in rows if r["stack"] == "sstack")["image"]
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    shot = Path(os.environ.get("MSC_RAY_SCREENSHOT", tmp_path / "page.png"))
    cards = browse(server["url"], [img, bad], shot, stack="sstack")
    ok = next(c for c in cards if c["status"] == "ok")
    err = next(c for c in cards if c["status"] == "error")
    assert "band" in ok["text"] and "confluence" in ok["text"] and "%" in ok["text"]
    assert int(ok["boxes"]) > 0 and "abnormal cell" in ok["text"]
    assert "notes.png: not an image" in err["text"]
    assert ok["cam"]  # the Grad-CAM overlay arrived and is shown with the toggle on
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(c["fits"] for c in cards)
    (phone,) = browse(server["url"], [img], tmp_path / "phone.png", stack="sstack", width=390)
    assert phone["fits"] and "band" in phone["text"] and int(phone["boxes"]) > 0


def browse(
    url: str, files: list[Path], shot: Path, stack: str | None = None, csv_dir: Path | None = None, width: int = 1100
):
    """Open the page in headless chromium, choose ``files``, wait until each card has its answer, turn the
    heat map on, save a screenshot; returns per card its status, text, drawn box count and whether a
    Grad-CAM overlay is shown."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        opts.add_argument(a)
    opts.add_argument(f"--window-size={width},900")
    if csv_dir:
        opts.add_experimental_option("prefs", {"download.default_directory": str(csv_dir)})
    d = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        d.get(url)
        WebDriverWait(d, 30).until(lambda d: "loading" not in d.find_element(By.ID, "models").text)
        if stack and d.find_element(By.ID, "stack-box").is_displayed():
            Select(d.find_element(By.ID, "stack")).select_by_value(stack)
        d.find_element(By.ID, "file").send_keys("\n".join(str(f) for f in files))
        done = ".card[data-drawn='1'], .card[data-status='error']"
        WebDriverWait(d, 120).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, done)) == len(files))
        d.find_element(By.ID, "cam").click()
        out = []
        for c in d.find_elements(By.CSS_SELECTOR, ".card"):
            canvases = c.find_elements(By.TAG_NAME, "canvas")
            cams = c.find_elements(By.CSS_SELECTOR, "img.cam")
            out.append(
                {
                    "status": c.get_attribute("data-status"),
                    "text": c.text,
                    "boxes": canvases[0].get_attribute("data-boxes") if canvases else None,
                    "cam": bool(cams) and cams[0].is_displayed(),
                    # the page fits the window: no sideways scrolling (a phone's width too)
                    "fits": d.execute_script("return document.documentElement.scrollWidth <= window.innerWidth"),
                }
            )
        if csv_dir:
            d.find_element(By.ID, "csv").click()
            WebDriverWait(d, 20).until(lambda _: list(csv_dir.glob("*.csv")))
        shot.parent.mkdir(parents=True, exist_ok=True)
        d.save_screenshot(str(shot))
        return out
    finally:
        d.quit()


def test_ctrl_c_stops_the_service_and_frees_the_port(server):
    code = stop_server(server["proc"])
    text = server["log"].read_text()
    assert code == 0, f"exit status {code}; the service's last lines: {text.splitlines()[-5:]}"
    assert "stopped" in text and "Traceback" not in text
    import psutil

    def listening() -> bool:
        conns = psutil.net_connections()
        return any(c.laddr and c.laddr.port == server["port"] and c.status == "LISTEN" for c in conns)

    deadline = time.monotonic() + 30
    while listening() and time.monotonic() < deadline:  # Ray's proxy process goes with the local Ray
        time.sleep(0.5)
    assert not listening()


def test_a_taken_port_or_a_wrong_artifact_is_one_line_before_anything_starts(artifacts, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "msc_ray.cli", "serve", "--classifier", str(artifacts / "clf_s")]
        r = subprocess.run(
            [*cmd, "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert r.returncode == 1 and r.stderr.strip() == f"error: --port {port}: already in use on 127.0.0.1"
    r = subprocess.run(
        [sys.executable, "-m", "msc_ray.cli", "serve", "--classifier", str(artifacts / "det")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1 and r.stderr.strip().endswith("a detector artifact, not a classifier")
    r = subprocess.run(
        [*cmd, "--detach"], capture_output=True, text=True, timeout=120, env={**os.environ, "RAY_ADDRESS": ""}
    )
    assert r.returncode == 1 and r.stderr.strip().startswith("error: --detach: needs a cluster")


# --------------------------------------------------------------------------------------------------
# Any labelled corpus: tune → serve for neural-stem-cell fate (four classes, colour)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fate_model(ray_session, tmp_path_factory):
    from msc_ray import corpus
    from msc_ray import tune as mt

    root = tmp_path_factory.mktemp("nsc")
    fate.synthesize(root / "corpus", per_class=24, size=64, seed=1)
    table, _ = corpus.index_corpus(str(root / "corpus"), folds=3, seed=0)
    manifest = corpus.write_manifest(table, str(root / "manifest.parquet"))
    job = mt.TuneJobConfig(
        manifest=manifest,
        out=str(root / "run"),
        stack="nsc",
        backbones=("compact_cnn",),
        max_epochs=8,
        patience=4,
        samples=1,
        lr_min=3e-3,
        lr_max=3e-3,
        size=64,
        batch_size=16,
        pretrained="none",
        asha=False,
        verbose=0,
    )
    outcome = mt.run_search(job)
    held = fate.synthesize(root / "new", per_class=5, size=64, seed=99)
    return outcome.outputs["artifact"], root / "new", held


def test_a_fate_model_tuned_here_is_served_with_its_own_classes(fate_model, tmp_path):
    from ray import serve

    from msc_ray import serve as serve_mod

    artifact, new, held = fate_model
    port = free_port()
    # one replica at first, a second one under load (the autoscaler's bounds)
    cfg = serve_mod.ServeConfig(
        classifier=(artifact,),
        port=port,
        cpus_per_replica=0.5,
        min_replicas=1,
        max_replicas=2,
        target_ongoing_requests=1,
        upscale_delay_s=1,
    )

    def running() -> int:
        states = serve.status().applications[serve_mod.APP_NAME].deployments["QCService"].replica_states
        return states.get("RUNNING", 0)

    try:
        url = serve_mod.start(cfg)
        assert running() == 1
        status, m = http("GET", url + "models")
        assert list(m["classifiers"]) == ["nsc"] and m["classifiers"]["nsc"]["bands"] is False
        right = 0
        for r in held:
            status, res = http("POST", url + "predict", (new / r["path"]).read_bytes())
            assert status == 200, res
            assert res["classes"] == list(fate.FATES) and res["labels"] == list(fate.FATES)
            assert res["band"] is None and res["confluence_pct"] is None and res["abnormal_cells"] is None
            right += res["predicted_class"] == r["fate"]
        assert right / len(held) >= 0.6, f"{right}/{len(held)} new images right"  # chance: 0.25
        image = (new / held[0]["path"]).read_bytes()
        deadline = time.monotonic() + 90
        with ThreadPoolExecutor(8) as pool:
            while running() < 2 and time.monotonic() < deadline:
                assert all(st == 200 for st, _ in pool.map(lambda _: http("POST", url + "predict", image), range(16)))
        assert running() == 2, "the autoscaler did not add a replica under load"
        if CHROMIUM and CHROMEDRIVER:
            cards = browse(url, [new / held[0]["path"]], tmp_path / "fate.png", csv_dir=tmp_path)
            assert "class" in cards[0]["text"] and "confluence" not in cards[0]["text"]
            assert any(f in cards[0]["text"] for f in fate.FATES)
            lines = next(tmp_path.glob("*.csv")).read_text().splitlines()
            assert lines[0].split(",")[:3] == ["name", "stack", "predicted_class"]
            assert "p_neuron" in lines[0] and len(lines) == 2
    finally:
        serve.shutdown()
