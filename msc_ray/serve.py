"""Online scoring on Ray Serve: one image at a time, through a JSON API and a page.

The application is one deployment, :class:`QCService`, with a FastAPI ingress:

* ``GET /`` — the page (plain HTML/JS from ``msc_ray/web/``): drop or choose images, see each with
  the abnormal-cell boxes, the band, the confluence % and the probabilities; a Grad-CAM overlay; CSV.
* ``POST /predict`` — one image as the body (raw bytes) or as a multipart form's file; query
  ``stack`` (which classifier, when several are loaded), ``cam=1`` (Grad-CAM heat map as a PNG data
  URL), ``preview=1`` (the decoded image as a PNG data URL, for formats a browser cannot show).
* ``GET /healthz``, ``GET /models`` (the loaded artifacts with their configs and the limits).

Decoding, preprocessing, model loading and the reading of outputs are :mod:`msc_ray.inference` and
:func:`msc_ray.score.stack_models` — the same code as archive scoring. Model calls from concurrent
requests are batched on the replica (``@serve.batch``); replicas autoscale between bounds. A bad
upload is a 4xx JSON error naming the reason; nothing from a request is used as a path.
"""

import asyncio
import base64
import io
import logging
import re
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from ray import serve

from . import images, inference
from . import score as scoring

log = logging.getLogger(__name__)

WEB = Path(__file__).with_name("web")
APP_NAME = "msc-ray"


@dataclass(frozen=True)
class ServeConfig:
    # one artifact per stack: "STACK=ARTIFACT" entries, or a bare ARTIFACT for the stack it was trained on
    classifier: tuple[str, ...]
    detector: str | None = None
    detect_all_stacks: bool = False  # the detector was trained on single-stack images
    endpoint_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    min_replicas: int = 1
    max_replicas: int = 1
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    target_ongoing_requests: float = 8.0  # per replica; the autoscaler adds replicas above it
    upscale_delay_s: float = 10.0  # load must stay above the target this long before a replica is added
    max_batch_size: int = 16  # images per model call
    batch_wait_s: float = 0.01  # how long a call waits for more requests to batch
    max_request_mb: float = 50.0
    max_pixels: int = 40_000_000

    def validate(self) -> None:
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"--replicas {self.max_replicas} (--min-replicas {self.min_replicas}): need 1 ≤ min ≤ max")
        if not 0 < self.port < 65536:
            raise ValueError(f"--port {self.port}: not a TCP port")
        if self.gpus_per_replica < 0 or self.cpus_per_replica <= 0:
            raise ValueError("--gpus-per-replica / --cpus-per-replica: must be ≥ 0 / > 0")
        if self.max_request_mb <= 0 or self.max_pixels <= 0:
            raise ValueError("--max-request-mb / --max-pixels: must be > 0")


class BadUpload(Exception):
    """A request that cannot be scored: ``status`` (4xx), ``reason`` (a short code), one-line message."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status, self.reason = status, reason


# an images.ImageError subclass → (HTTP status, reason code)
IMAGE_ERRORS = {
    images.EmptyImageError: (400, "empty"),
    images.NotAnImageError: (415, "not_an_image"),
    images.TruncatedImageError: (400, "truncated"),
    images.ImageTooLargeError: (413, "too_many_pixels"),
    images.UnsupportedImageError: (415, "unsupported_layout"),
}


def upload_name(filename: str | None) -> str:
    """A name for messages only (never a path on disk): the last part of the client's file name,
    printable characters, at most 100."""
    name = PurePosixPath(str(filename or "").replace("\\", "/")).name
    name = re.sub(r"[^\w.\- ()+]", "_", name)[:100]
    return name or "upload"


def png_data_url(rgb: np.ndarray) -> str:
    """``(H, W, 3|4)`` uint8 → ``data:image/png;base64,…``."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def preview_image(img: np.ndarray, longest: int = 512) -> np.ndarray:
    """Decoded image ``(C, H, W)`` in [0, 1] → ``(h, w, 3)`` uint8, longest side at most ``longest``."""
    import torch
    from torchvision.transforms.v2 import functional as F

    rgb = torch.from_numpy(images.to_channels(img, 3))
    h, w = rgb.shape[-2:]
    if max(h, w) > longest:
        s = longest / max(h, w)
        rgb = F.resize(rgb, [max(1, round(h * s)), max(1, round(w * s))], antialias=True)
    return (rgb.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def cam_overlay(cam: np.ndarray) -> np.ndarray:
    """Grad-CAM map ``(S, S)`` in [0, 1] → RGBA uint8 (the 'inferno' colours, opacity rising with
    the map) for laying over the image."""
    from matplotlib import colormaps

    rgba = colormaps["inferno"](cam)
    rgba[..., 3] = 0.15 + 0.6 * cam
    return (rgba * 255).round().astype(np.uint8)


async def read_upload(request: Request, limit: int) -> tuple[bytes, str]:
    """The image bytes and a display name from a raw body or a multipart form; 413 over ``limit``
    bytes (checked on the header first, then while reading)."""
    from starlette.formparsers import MultiPartParser

    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise BadUpload(413, "request_too_large", f"request of {int(declared)} bytes over the {limit}-byte limit")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadUpload(413, "request_too_large", f"request over the {limit}-byte limit")
        chunks.append(chunk)
    body = b"".join(chunks)
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("multipart/form-data"):
        return body, upload_name(request.query_params.get("name"))

    async def one():
        yield body

    try:
        form = await MultiPartParser(request.headers, one(), max_files=1, max_fields=10, max_part_size=limit).parse()
    except Exception as exc:
        raise BadUpload(400, "bad_form", f"multipart form could not be read ({' '.join(str(exc).split())})") from None
    files = [v for v in form.values() if hasattr(v, "read") and hasattr(v, "filename")]
    if not files:
        raise BadUpload(400, "no_file", "multipart form without a file (send the image as the field 'file')")
    f = files[0]
    return await f.read(), upload_name(f.filename)


api = FastAPI(title="msc-ray", docs_url=None, redoc_url=None)


@serve.deployment(name="QCService", max_ongoing_requests=64)
@serve.ingress(api)
class QCService:
    """The models of every stack on one replica; requests are decoded on a thread, and their model calls
    batched (``@serve.batch``)."""

    def __init__(self, cfg: dict):
        self.cfg = ServeConfig(**{**cfg, "classifier": tuple(cfg["classifier"])})
        sm = scoring.stack_models(
            scoring.classifier_entries(self.cfg.classifier),
            self.cfg.detector,
            self.cfg.endpoint_url,
            self.cfg.detect_all_stacks,
        )
        device = inference.default_device()
        self.classifiers = {
            s: inference.Classifier(uri, self.cfg.endpoint_url, device) for s, (uri, _) in sm.classifiers.items()
        }
        self.detector = (
            inference.Detector(self.cfg.detector, self.cfg.endpoint_url, device) if self.cfg.detector else None
        )
        self.detects = {s: bool(sm.versions(s)[1]) for s in self.classifiers}
        self.lock = threading.Lock()  # one model call at a time: Grad-CAM's hooks must not see a batch
        self.page = (WEB / "index.html").read_text()
        self.batched.set_max_batch_size(self.cfg.max_batch_size)
        self.batched.set_batch_wait_timeout_s(self.cfg.batch_wait_s)

    # ---------------------------------------------------------------------------------------------
    @api.get("/", response_class=HTMLResponse)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(self.page)

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "classifiers": sorted(self.classifiers), "detector": self.detector is not None}

    @api.get("/models")
    async def models(self) -> dict:
        return {
            "classifiers": {
                s: {
                    "uri": c.uri,
                    "version": c.version,
                    "bands": c.is_bands,
                    "detector": self.detects[s],
                    "config": c.config,
                }
                for s, c in self.classifiers.items()
            },
            "detector": {"uri": self.detector.uri, "version": self.detector.version, "config": self.detector.config}
            if self.detector
            else None,
            "limits": {"max_request_bytes": self._limit(), "max_pixels": self.cfg.max_pixels},
        }

    @api.post("/predict")
    async def predict(self, request: Request) -> JSONResponse:
        t0 = time.perf_counter()
        try:
            stack = self._stack(request.query_params.get("stack"))
            data, name = await read_upload(request, self._limit())
            prep = await asyncio.to_thread(self._prepare, data, name, stack)
            t1 = time.perf_counter()
            probs, regressed, boxes, batch = await self.batched((stack, prep["x"], prep.get("det"), prep.get("scale")))
            t2 = time.perf_counter()
        except BadUpload as exc:
            return JSONResponse({"error": str(exc), "reason": exc.reason}, status_code=exc.status)
        clf = self.classifiers[stack]
        out = {
            "name": name,
            "width": prep["width"],
            "height": prep["height"],
            "stack": stack,
            "classes": clf.classes,
            "labels": [inference.BAND_LABELS[c] for c in clf.classes] if clf.is_bands else clf.classes,
            "probabilities": [round(float(p), 5) for p in probs],
            **inference.interpret(clf.classes, probs, float(regressed)),
            "abnormal_cells": [dict(zip(("x1", "y1", "x2", "y2", "score"), b, strict=True)) for b in boxes]
            if boxes is not None
            else None,
            "models": {"classifier": clf.version, "detector": self.detector.version if boxes is not None else None},
        }
        out["n_abnormal"] = len(boxes) if boxes is not None else None
        q = request.query_params
        if q.get("preview") == "1":
            out["preview"] = png_data_url(preview_image(prep["img"]))
        if q.get("cam") == "1":
            cam = await asyncio.to_thread(self._cam, clf, prep["x"], int(np.argmax(probs)))
            out["cam"] = png_data_url(cam_overlay(cam)) if cam is not None else None
        out["timing_ms"] = {
            "decode": round(1000 * (t1 - t0), 2),
            "model": round(1000 * (t2 - t1), 2),
            "total": round(1000 * (time.perf_counter() - t0), 2),
            "batch": batch,  # requests in the model call this one was part of
        }
        return JSONResponse(out)

    # ---------------------------------------------------------------------------------------------
    def _limit(self) -> int:
        return int(self.cfg.max_request_mb * 1024 * 1024)

    def _stack(self, asked: str | None) -> str:
        if asked:
            if asked not in self.classifiers:
                raise BadUpload(
                    400, "unknown_stack", f"stack {asked!r}: loaded are {', '.join(sorted(self.classifiers))}"
                )
            return asked
        if len(self.classifiers) == 1:
            return next(iter(self.classifiers))
        raise BadUpload(400, "stack_needed", f"give ?stack= one of {', '.join(sorted(self.classifiers))}")

    def _prepare(self, data: bytes, name: str, stack: str) -> dict:
        try:
            img = images.decode(data, name, self.cfg.max_pixels)
        except images.ImageError as exc:
            status, reason = IMAGE_ERRORS.get(type(exc), (400, "bad_image"))
            raise BadUpload(status, reason, str(exc)) from None
        out = {"img": img, "height": int(img.shape[-2]), "width": int(img.shape[-1])}
        out["x"] = self.classifiers[stack].prepare(img)
        if self.detector is not None and self.detects[stack]:
            out["det"], out["scale"] = self.detector.prepare(img)
        return out

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def batched(self, items: list[tuple]) -> list[tuple]:
        """Items ``(stack, classifier input, detector input or None, scale)`` → ``(probs, regressed,
        boxes or None, images in this call)`` each; one classifier call per stack and one detector call per batch."""
        return await asyncio.to_thread(self._forward, items)

    def _forward(self, items: list[tuple]) -> list[tuple]:
        out: list = [None] * len(items)
        with self.lock:
            for stack in {it[0] for it in items}:
                idx = [i for i, it in enumerate(items) if it[0] == stack]
                probs, reg = self.classifiers[stack](np.stack([items[i][1] for i in idx]))
                for j, i in enumerate(idx):
                    out[i] = [probs[j], reg[j], None, len(items)]
            didx = [i for i, it in enumerate(items) if it[2] is not None]
            if didx:
                found = self.detector([items[i][2] for i in didx], [items[i][3] for i in didx])
                for i, bx in zip(didx, found, strict=True):
                    out[i][2] = bx
        return [tuple(o) for o in out]

    def _cam(self, clf: inference.Classifier, x: np.ndarray, target: int) -> np.ndarray | None:
        with self.lock:
            return clf.grad_cam(x, target)


# ------------------------------------------------------------------------------------------------
# Building and running the application
# ------------------------------------------------------------------------------------------------


def build(cfg: ServeConfig):
    """The bound application: replicas between ``min_replicas`` and ``max_replicas``, each with its
    CPUs/GPUs."""
    cfg.validate()
    opts: dict = {"ray_actor_options": {"num_cpus": cfg.cpus_per_replica, "num_gpus": cfg.gpus_per_replica}}
    if cfg.max_replicas > cfg.min_replicas:
        opts["autoscaling_config"] = {
            "min_replicas": cfg.min_replicas,
            "max_replicas": cfg.max_replicas,
            "target_ongoing_requests": cfg.target_ongoing_requests,
            "upscale_delay_s": cfg.upscale_delay_s,
        }
    else:
        opts["num_replicas"] = cfg.min_replicas
    return QCService.options(**opts).bind(asdict(cfg))


def app(args: dict):
    """Application builder for ``serve run`` / ``serve deploy`` configs: ``args`` are
    :class:`ServeConfig` fields (``classifier`` a list of ``STACK=ARTIFACT`` entries)."""
    fields = {k: v for k, v in args.items() if k in ServeConfig.__dataclass_fields__}
    cls = fields.get("classifier", ())
    fields["classifier"] = (cls,) if isinstance(cls, str) else tuple(cls)
    return build(ServeConfig(**fields))


def check(cfg: ServeConfig) -> None:
    """Before anything starts: options, and every artifact loaded once here on the CPU, so that a
    missing, mistyped or mismatched artifact is one line naming it (a replica's failure is not)."""
    import torch

    cfg.validate()
    sm = scoring.stack_models(
        scoring.classifier_entries(cfg.classifier), cfg.detector, cfg.endpoint_url, cfg.detect_all_stacks
    )
    cpu = torch.device("cpu")
    for option, uri, kind in [("--classifier", uri, inference.Classifier) for uri, _ in sm.classifiers.values()] + (
        [("--detector", cfg.detector, inference.Detector)] if cfg.detector else []
    ):
        try:
            kind(uri, cfg.endpoint_url, cpu)
        except Exception as exc:
            raise ValueError(
                f"{option} {uri}: cannot be loaded ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
            ) from None


def root_cause(exc: BaseException) -> str:
    """The last ``...Error: message`` line of a deployment failure (Serve nests the replica's traceback)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if re.match(r"\s*\w*(Error|Exception)\b.*: ", ln)]
    return lines[-1][:300] if lines else " ".join(str(exc).split())[:300]


def port_free(host: str, port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def start(cfg: ServeConfig, *, blocking_probe_s: float = 120.0) -> str:
    """Deploy the application on the connected Ray (local when none) and wait until it answers;
    returns the page's URL."""
    import urllib.request

    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build(cfg), name=APP_NAME, route_prefix="/", blocking=False)
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    url = f"http://{'127.0.0.1' if cfg.host in ('0.0.0.0', '::') else host}:{cfg.port}/"
    deadline = time.monotonic() + blocking_probe_s
    while True:
        try:
            with urllib.request.urlopen(url + "healthz", timeout=5) as r:
                if r.status == 200:
                    return url
        except Exception:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url}: the service did not answer within {blocking_probe_s:.0f}s") from None
        time.sleep(0.5)
