"""Batch scoring of archived production images into a Parquet report, exactly once.

Pipeline, per chunk of the archive (Ray Data, streamed)::

    list (boto3 paginator / local walk) → read bytes → decode → preprocess   [CPU tasks]
        → model actors: classifier (+ detector), loaded once per actor         [actor pool, GPUs optional]
        → report rows → one Parquet part per chunk, published atomically

Report layout (a local folder or an ``s3://`` prefix)::

    REPORT/parts/<run id>-<chunk>.parquet      published parts (what a plain Parquet reader of REPORT sees)
    REPORT/_commits/<run id>-<chunk>.json      completion manifests
    REPORT/_staging/...                        parts being written; never read

Publishing a part: write it under ``_staging``, write its manifest, then move the part into
``parts/``. The move is the commit: a part is in ``parts/`` only once its manifest exists, so a run
killed at any step never leaves a part that ``pandas.read_parquet(REPORT)`` would read and a rerun
would score again (duplicate rows). A manifest whose part never arrived is ignored by every reader,
and its objects are scored again. Part names are ``<run id>-<chunk>``: a run id is a name (letters,
digits, ``-_.``) that a report has not seen before, so no part is ever overwritten.

Exactly once: an object is keyed by its URI and version (S3 ETag; size and mtime locally) and the
model versions. A rerun lists the committed manifests and skips those keys, so a run killed half-way
and run again ends with one row per object; the chunks it had committed are kept.

The confluence-percent estimate always lies inside the predicted band: the classifier's regressed
confluence (where it was trained on measured confluence) clipped to the band, else an order-aware
position inside the band from the calibrated probabilities (:func:`msc_ray.metrics.confluence_in_band`).
It is given only for the four standard bands.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import secrets
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import BAND_EDGES, BAND_NAMES, images, metrics, storage

log = logging.getLogger(__name__)

BAND_LABELS = {name: f"{100 * BAND_EDGES[i]:.0f}-{100 * BAND_EDGES[i + 1]:.0f}%" for i, name in enumerate(BAND_NAMES)}
KEY_PATTERN = re.compile(r"(?P<vessel>[A-Za-z0-9]+)_d(?P<day>\d+)(?:_(?P<position>[A-Za-z0-9]+))?")
STACK_CHOICES = ("auto", "sstack", "mstack")

BOX_TYPE = pa.struct(
    [
        ("x1", pa.float32()),
        ("y1", pa.float32()),
        ("x2", pa.float32()),
        ("y2", pa.float32()),
        ("score", pa.float32()),
    ]
)
REPORT_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("key", pa.string()),  # relative to the archive root
        ("size", pa.int64()),
        ("version", pa.string()),  # S3 ETag, or "<size>:<mtime ns>" for a local file
        ("stack", pa.string()),
        ("status", pa.string()),  # ok | error
        ("error", pa.string()),
        ("error_kind", pa.string()),  # permanent (the object: corrupt, not an image, gone) | transient (reading it)
        ("predicted_class", pa.string()),
        ("band", pa.string()),
        ("classes", pa.list_(pa.string())),
        ("probabilities", pa.list_(pa.float32())),
        ("confluence_pct", pa.float32()),
        ("abnormal_boxes", pa.list_(BOX_TYPE)),
        ("n_abnormal", pa.int32()),
        ("vessel", pa.string()),
        ("day", pa.int32()),
        ("position", pa.string()),
        ("classifier_version", pa.string()),
        ("detector_version", pa.string()),
        ("run_id", pa.string()),
        ("scored_at", pa.timestamp("ms", tz="UTC")),
    ]
)


@dataclass(frozen=True)
class ScoreConfig:
    archive: str
    classifier: str
    out: str
    detector: str | None = None
    stack: str = "auto"  # auto: from a "sstack"/"mstack" folder in the key, else the classifier's stack
    detect_all_stacks: bool = False  # the detector was trained on single-stack images
    batch_size: int = 32  # images per model call
    decode_batch: int = 32  # images per decode task
    concurrency: int = 1  # model actors
    gpus_per_actor: float = 0.0
    chunk_size: int = 2000  # objects per committed part
    run_id: str = ""
    endpoint_url: str | None = None
    max_pixels: int = images.DEFAULT_MAX_PIXELS
    read_attempts: int = 4  # tries per object on a store error, with exponential backoff from retry_delay
    retry_delay: float = 1.0
    key_pattern: str | None = None  # regex with named groups vessel, day, position, searched in the key
    metadata: str | None = None  # CSV or Parquet table: key, and vessel / day / position columns

    def validate(self) -> None:
        if self.run_id and not RUN_ID.fullmatch(self.run_id):
            raise ValueError(
                f"--run-id {self.run_id!r}: a run id is a name (letters, digits, '-', '_', '.'; "
                "not starting with '.'), never a path"
            )
        if self.key_pattern is not None:
            _compile_key_pattern(self.key_pattern)
        if self.stack not in STACK_CHOICES:
            raise ValueError(f"--stack must be one of {', '.join(STACK_CHOICES)}, got {self.stack!r}")
        for name in ("batch_size", "decode_batch", "concurrency", "chunk_size", "read_attempts"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")


RUN_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")


def _compile_key_pattern(pattern: str) -> re.Pattern:
    try:
        rx = re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"--key-pattern {pattern!r}: not a regular expression ({exc})") from None
    if "vessel" not in rx.groupindex:
        raise ValueError(f"--key-pattern {pattern!r}: needs a named group (?P<vessel>...), and may have day, position")
    return rx


class KeyFields:
    """Vessel, day and position of an object key: from a metadata table (``--metadata``, keyed by the
    key relative to the archive), else a user pattern (``--key-pattern``, searched in the whole key),
    else the default file-name convention ``S003_d04_tl.png``."""

    def __init__(self, key_pattern: str | None = None, metadata: str | None = None, endpoint_url: str | None = None):
        self.pattern = _compile_key_pattern(key_pattern) if key_pattern else None
        self.table: dict[str, tuple] = _read_metadata(metadata, endpoint_url) if metadata else {}

    def __call__(self, key: str) -> tuple[str | None, int | None, str | None]:
        if key in self.table:
            return self.table[key]
        if self.pattern is not None:
            m = self.pattern.search(key)
        else:
            m = KEY_PATTERN.search(PurePosixPath(key).stem)
        if not m:
            return None, None, None
        g = m.groupdict()
        return g.get("vessel"), _as_day(g.get("day")), g.get("position")


def _as_day(v) -> int | None:
    if v is None or v == "":
        return None
    try:
        return int(float(v))
    except (TypeError, ValueError):
        digits = re.search(r"\d+", str(v))
        return int(digits.group()) if digits else None


def _read_metadata(uri: str, endpoint_url: str | None) -> dict[str, tuple]:
    """``{key: (vessel, day, position)}`` from a CSV or Parquet table with a ``key`` column."""
    import pyarrow.csv as pacsv

    loc = storage.resolve(uri, endpoint_url)
    try:
        if uri.lower().endswith((".parquet", ".pq")):
            t = pq.read_table(loc.path, filesystem=loc.fs)
        else:
            with loc.fs.open_input_stream(loc.path) as fh:
                t = pacsv.read_csv(fh, convert_options=pacsv.ConvertOptions(strings_can_be_null=True))
    except (OSError, pa.ArrowInvalid) as exc:
        raise ValueError(f"--metadata {uri}: cannot read ({storage.describe_error(exc)})") from None
    if "key" not in t.column_names or not {"vessel", "day", "position"} & set(t.column_names):
        raise ValueError(f"--metadata {uri}: needs a 'key' column and vessel, day or position columns")
    cols = [
        t.column(c).to_pylist() if c in t.column_names else [None] * t.num_rows for c in ("vessel", "day", "position")
    ]
    return {
        str(k): (None if v is None else str(v), _as_day(d), None if p is None else str(p))
        for k, v, d, p in zip(t.column("key").to_pylist(), *cols, strict=True)
    }


@dataclass
class ArchiveObject:
    uri: str
    key: str
    size: int
    version: str


@dataclass
class ScoreSummary:
    run_id: str
    listed: int = 0
    ignored: int = 0  # objects whose names are not images
    skipped: int = 0  # already in the report
    scored: int = 0
    errors: int = 0
    parts: list[str] = field(default_factory=list)
    seconds: float = 0.0
    no_vessel: int = 0  # committed rows whose key gave no vessel (no per-vessel plot for them)


# --------------------------------------------------------------------------------------------------
# Listing
# --------------------------------------------------------------------------------------------------


def _split_s3(uri: str) -> tuple[str, str]:
    rest = uri[len("s3://") :]
    bucket, _, prefix = rest.partition("/")
    return bucket, prefix.strip("/")


def list_archive(archive: str, endpoint_url: str | None = None, exclude: str | None = None) -> list[ArchiveObject]:
    """Every object under ``archive`` (sorted by key), with what identifies its version.
    Objects under ``exclude`` (the report, when it lies inside the archive) are left out."""
    out: list[ArchiveObject] = []
    if storage.is_s3(archive):
        bucket, prefix = _split_s3(archive)
        client = storage.s3_client(endpoint_url)
        try:
            pages = client.get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=prefix + "/" if prefix else ""
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    key = obj["Key"]
                    if key.endswith("/"):
                        continue
                    rel = key[len(prefix) + 1 :] if prefix else key
                    out.append(ArchiveObject(f"s3://{bucket}/{key}", rel, int(obj["Size"]), obj["ETag"].strip('"')))
        except Exception as exc:  # botocore ClientError, EndpointConnectionError, NoCredentialsError, ...
            raise storage.StorageError(f"cannot list {archive}: {_s3_reason(exc)}") from None
    else:
        root = os.path.abspath(archive)
        if not os.path.isdir(root):
            raise ValueError(f"{archive}: no such folder")
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for fn in filenames:
                path = os.path.join(dirpath, fn)
                rel = os.path.relpath(path, root).replace(os.sep, "/")
                try:
                    st = os.stat(path)
                except OSError as exc:  # a dangling link, a link loop: listed, it becomes an error row
                    out.append(ArchiveObject(path, rel, -1, f"unreadable:{exc.errno}"))
                    continue
                out.append(ArchiveObject(path, rel, st.st_size, f"{st.st_size}:{st.st_mtime_ns}"))
    if exclude:
        out = [o for o in out if not o.uri.startswith(exclude.rstrip("/") + "/")]
    out.sort(key=lambda o: o.key)
    return out


def _s3_reason(exc: BaseException) -> str:
    err = getattr(exc, "response", {}).get("Error", {}) if hasattr(exc, "response") else {}
    if err:
        return f"{err.get('Code', 'error')} ({err.get('Message', '')})".strip()
    return storage.describe_error(exc) or type(exc).__name__


def check_writable(out: str, endpoint_url: str | None = None) -> None:
    """Fail fast, before any work, when the report location cannot be written."""
    if storage.is_s3(out):
        bucket, _ = _split_s3(out)
        try:
            storage.s3_client(endpoint_url).head_bucket(Bucket=bucket)
        except Exception as exc:
            raise storage.StorageError(f"cannot write the report to {out}: {_s3_reason(exc)}") from None
    else:
        try:
            os.makedirs(out, exist_ok=True)
            probe = os.path.join(out, f".probe-{secrets.token_hex(4)}")
            open(probe, "wb").close()
            os.remove(probe)
        except OSError as exc:
            raise ValueError(f"--out {out}: not writable ({exc.strerror or exc})") from None


# --------------------------------------------------------------------------------------------------
# The report: committed parts
# --------------------------------------------------------------------------------------------------


def _report_loc(out: str, endpoint_url: str | None):
    return storage.resolve(out, endpoint_url)


def committed(out: str, endpoint_url: str | None = None) -> list[dict]:
    """The completion manifests of a report whose parts reached ``parts/`` (empty when there is no
    report yet). A run killed between the two steps leaves a manifest without its part: its objects
    were never in the report."""
    import pyarrow.fs as pafs

    loc = _report_loc(out, endpoint_url)
    try:
        infos = loc.fs.get_file_info(pafs.FileSelector(loc.join("_commits"), allow_not_found=True))
        parts = {i.base_name for i in loc.fs.get_file_info(pafs.FileSelector(loc.join("parts"), allow_not_found=True))}
    except OSError as exc:
        raise storage.StorageError(f"cannot read the report {out}: {storage.describe_error(exc)}") from None
    manifests = []
    for info in sorted(infos, key=lambda i: i.path):
        if info.path.endswith(".json"):
            with loc.fs.open_input_stream(info.path) as fh:
                m = json.loads(fh.read())
            if m["part"] in parts:
                manifests.append(m)
    return manifests


def _run_id_used(out: str, endpoint_url: str | None, run_id: str) -> bool:
    """Whether the report already has a manifest of this run, by name (``<run id>-<chunk>.json``):
    one listing, no manifest read."""
    import pyarrow.fs as pafs

    loc = _report_loc(out, endpoint_url)
    names = loc.fs.get_file_info(pafs.FileSelector(loc.join("_commits"), allow_not_found=True))
    own = re.compile(re.escape(run_id) + r"-\d{5}\.json")
    return any(own.fullmatch(i.base_name) for i in names)


def read_report(out: str, endpoint_url: str | None = None, columns: list[str] | None = None) -> pa.Table:
    """All committed rows of a report (a table with :data:`REPORT_SCHEMA`, possibly empty)."""
    loc = _report_loc(out, endpoint_url)
    tables = [
        pq.read_table(loc.join("parts", m["part"]), filesystem=loc.fs, columns=columns)
        for m in committed(out, endpoint_url)
    ]
    if not tables:
        schema = REPORT_SCHEMA if columns is None else pa.schema([REPORT_SCHEMA.field(c) for c in columns])
        return schema.empty_table()
    table = pa.concat_tables(tables)
    return table if columns is not None else _current(table)


def _current(table: pa.Table) -> pa.Table:
    """The report without transient error rows that a later run has replaced (a row of the same
    object version and models that is not a transient error): one row per object once it has been
    read. A plain Parquet reader sees those rows too; filter ``error_kind != 'transient'`` there."""
    import pyarrow.compute as pc

    transient = pc.fill_null(pc.equal(table["error_kind"], "transient"), False)
    if not pc.any(transient).as_py():
        return table
    key = pc.binary_join_element_wise(
        *(pc.fill_null(table[c], "") for c in ("uri", "version", "classifier_version", "detector_version")), "\x00"
    )
    replaced = pc.is_in(key, value_set=pc.unique(pc.filter(key, pc.invert(transient))))
    return table.filter(pc.invert(pc.and_(transient, replaced)))


def _done_keys(out: str, endpoint_url: str | None, model_versions: tuple[str, str]) -> set[tuple[str, str]]:
    """(uri, version) of objects the report holds for these models; transient error rows do not count
    (those objects are scored again)."""
    cols = ["uri", "version", "classifier_version", "detector_version", "error_kind"]
    t = read_report(out, endpoint_url, columns=cols)
    if t.num_rows == 0:
        return set()
    return {
        (u, v)
        for u, v, c, d, kind in zip(*(t.column(i).to_pylist() for i in range(5)), strict=True)
        if (c or "", d or "") == model_versions and kind != "transient"
    }


def _publish(table: pa.Table, out: str, endpoint_url: str | None, name: str, meta: dict) -> str:
    """Write a part under _staging, then its manifest, then move the part into parts/ (the commit:
    a part a reader can see always has its manifest)."""
    loc = _report_loc(out, endpoint_url)
    staging, final = loc.join("_staging", f"{name}.parquet"), loc.join("parts", f"{name}.parquet")
    try:
        for d in ("_staging", "parts", "_commits"):
            loc.fs.create_dir(loc.join(d), recursive=True)
        pq.write_table(table, staging, filesystem=loc.fs)
        manifest = {**meta, "part": f"{name}.parquet", "rows": table.num_rows}
        tmp = loc.join("_staging", f"{name}.json")
        with loc.fs.open_output_stream(tmp) as fh:
            fh.write(json.dumps(manifest, indent=1).encode())
        loc.fs.move(tmp, loc.join("_commits", f"{name}.json"))
        _commit_part(loc, staging, final)
    except OSError as exc:  # the store died: what was committed stays, a rerun finishes the rest
        raise storage.StorageError(
            f"cannot write the report to {out} ({storage.describe_error(exc)}); the parts committed "
            "before are kept: run again to finish"
        ) from None
    return final


def _commit_part(loc, staging: str, final: str) -> None:
    """The commit: the part arrives in ``parts/`` (a rename locally; on S3 a copy, atomic for
    readers, then the staging object's delete)."""
    loc.fs.move(staging, final)


# --------------------------------------------------------------------------------------------------
# Ray Data stages
# --------------------------------------------------------------------------------------------------


def stack_of(key: str, default: str) -> str:
    parts = PurePosixPath(key).parts
    for s in ("sstack", "mstack"):
        if s in parts[:-1]:
            return s
    return default


def _preprocess(
    batch: dict,
    *,
    cls_cfg: dict,
    det_size: int | None,
    detect_all: bool,
    endpoint_url: str | None,
    max_pixels: int,
    read_attempts: int = 4,
    retry_delay: float = 1.0,
) -> dict:
    """CPU task: read, decode and preprocess a block of objects; a bad object becomes an error row.

    A store error (throttling, 5xx, timeout, connection) is retried ``read_attempts`` times with
    exponential backoff and then becomes a *transient* error row, scored again by the next run; once
    one object of the block has used up its retries, the rest get one try each (the store is down: no
    retry storm). A corrupt or unsupported image, or an object that is gone, is *permanent*."""
    import torch
    from torchvision import tv_tensors
    from torchvision.transforms.v2 import functional as F

    from . import augment
    from .config import DataConfig, from_dict

    cfg = from_dict(DataConfig, cls_cfg)
    tf = augment.build(cfg, train=False)
    n = len(batch["uri"])
    x = np.zeros((n, cfg.channels, cfg.size, cfg.size), np.float32)
    det = np.zeros((n, 3, det_size, det_size), np.float32) if det_size else None
    ok = np.zeros(n, bool)
    use_det = np.zeros(n, bool)
    scale = np.ones((n, 2), np.float32)  # detector input → original pixels (x, y)
    err = np.empty(n, dtype=object)
    transient = np.zeros(n, bool)
    attempts = read_attempts
    for i in range(n):
        uri, key = str(batch["uri"][i]), str(batch["key"][i])
        try:
            raw = _read_retrying(uri, endpoint_url, attempts, retry_delay)
            img = images.decode(raw, key, max_pixels)
        except images.ImageError as exc:
            err[i] = str(exc)
            continue
        except Exception as exc:
            if _permanent(exc):  # deleted since it was listed, a dangling link or a link loop, a folder
                err[i] = f"{key}: cannot read ({exc.strerror or storage.describe_error(exc)})"
            else:  # the store failed for this object, after retries
                err[i] = f"{key}: cannot read ({storage.describe_error(exc)})"
                transient[i], attempts = True, 1
            continue
        x[i] = tf({"image": tv_tensors.Image(torch.from_numpy(images.to_channels(img, cfg.channels)))})["image"]
        ok[i] = True
        err[i] = ""
        if det is not None and (detect_all or str(batch["stack"][i]) == "sstack"):
            h, w = img.shape[-2:]
            d = F.resize(torch.from_numpy(images.to_channels(img, 3)), [det_size, det_size], antialias=True)
            det[i] = d.numpy()
            use_det[i] = True
            scale[i] = (w / det_size, h / det_size)
    out = {"row": batch["row"], "image": x, "ok": ok, "error": err.astype(str), "transient": transient}
    if det is not None:
        out.update(det_image=det, use_det=use_det, det_scale=scale)
    return out


def _permanent(exc: BaseException) -> bool:
    """An error that reading again will not cure: the object is gone, or a local entry is not a
    readable file (dangling link, link loop, folder)."""
    import errno

    return isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError)) or (
        isinstance(exc, OSError) and exc.errno in (errno.ELOOP, errno.ENAMETOOLONG)
    )


def _read_retrying(uri: str, endpoint_url: str | None, attempts: int, delay: float) -> bytes:
    from . import data

    for attempt in range(attempts):
        try:
            return data.read_uri(uri, endpoint_url)
        except Exception as exc:
            if _permanent(exc) or attempt + 1 >= attempts:
                raise
            log.warning("retrying %s in %.1fs: %s", uri, delay * 2**attempt, storage.describe_error(exc))
            time.sleep(delay * 2**attempt)
    raise AssertionError("unreachable")


class ModelActor:
    """Holds the classifier (and detector) for the life of the actor; turns image batches into
    predictions. On a GPU, inference runs under autocast (bfloat16)."""

    def __init__(self, classifier: str, detector: str | None, endpoint_url: str | None):
        import torch

        from . import models

        self.torch = torch
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.clf, self.clf_cfg = models.load_classifier(classifier, endpoint_url)
        self.clf.to(self.device)
        self.temperature = float(self.clf_cfg.get("temperature", 1.0))
        self.det = None
        if detector:
            self.det, self.det_cfg = models.load_detector(detector, endpoint_url)
            self.det.to(self.device)

    def __call__(self, batch: dict) -> dict:
        """Batch in: ``row``, ``ok``, ``error``, ``image`` (N, C, S, S) [+ ``det_image``, ``use_det``,
        ``det_scale``]. Batch out: ``row``, ``ok``, ``error``, ``probs`` (N, K) calibrated, ``boxes``
        (JSON text per row: ``[[x1, y1, x2, y2, score], ...]`` in the original image's pixels)."""
        torch = self.torch
        n = len(batch["row"])
        ok = np.asarray(batch["ok"], bool)
        k = len(self.clf_cfg["classes"])
        probs = np.zeros((n, k), np.float32)
        conf = np.full(n, np.nan, np.float32)  # the confluence output (a fraction), when the model has one
        boxes = ["[]"] * n
        amp = self.device.type == "cuda"
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=amp):
            idx = np.flatnonzero(ok)
            if len(idx):
                out = self.clf(torch.from_numpy(batch["image"][idx]).to(self.device)).float()
                probs[idx] = torch.softmax(out[:, :k] / self.temperature, 1).cpu().numpy()
                if out.shape[1] > k:
                    conf[idx] = torch.sigmoid(out[:, k]).cpu().numpy()
            if self.det is not None:
                didx = np.flatnonzero(ok & np.asarray(batch["use_det"], bool))
                if len(didx):
                    imgs = [torch.from_numpy(batch["det_image"][i]).to(self.device) for i in didx]
                    for i, res in zip(didx, self.det(imgs), strict=True):
                        b = res["boxes"].float().cpu().numpy() * np.tile(batch["det_scale"][i], 2)
                        sc = res["scores"].float().cpu().numpy()
                        boxes[i] = json.dumps(
                            [
                                [round(float(v), 2) for v in bb] + [round(float(s), 4)]
                                for bb, s in zip(b, sc, strict=True)
                            ]
                        )
        return {
            "row": batch["row"],
            "ok": ok,
            "error": batch["error"],
            "transient": batch["transient"],
            "probs": probs,
            "confluence": conf,
            "boxes": np.array(boxes, dtype=object).astype(str),
        }


# --------------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------------


def _rows_for_chunk(
    objs: list[ArchiveObject],
    results: dict[int, tuple],
    stacks: list[str],
    classes: list[str],
    versions: tuple[str, str],
    run_id: str,
    detector: bool,
    detect_all: bool,
    fields: KeyFields | None = None,
) -> pa.Table:
    """Report rows of one chunk: ``results[i] = (ok, error, probs, boxes_json, confluence, transient)``
    for object ``i`` (confluence: the model's regressed fraction, NaN when it has no such output). An
    object with no result (a lost task or actor) is a transient error row."""
    now = dt.datetime.now(dt.timezone.utc)
    standard = classes == list(BAND_NAMES)
    fields = fields or KeyFields()
    rows = []
    for i, o in enumerate(objs):
        vessel, day, position = fields(o.key)
        row = {
            "uri": o.uri,
            "key": o.key,
            "size": o.size,
            "version": o.version,
            "stack": stacks[i],
            "vessel": vessel,
            "day": day,
            "position": position,
            "classifier_version": versions[0],
            "detector_version": versions[1] or None,
            "run_id": run_id,
            "scored_at": now,
        }
        ok, error, p, boxes, regressed, transient = results.get(
            i, (False, f"{o.key}: not scored (its task or actor was lost)", None, "[]", np.nan, True)
        )
        if ok:
            c = int(np.argmax(p))
            row.update(
                status="ok",
                error=None,
                predicted_class=classes[c],
                classes=classes,
                probabilities=[float(v) for v in p],
                band=BAND_LABELS.get(classes[c]) if standard else None,
                confluence_pct=float(
                    metrics.confluence_in_band(
                        np.asarray(p)[None], None if np.isnan(regressed) else np.array([regressed])
                    )[0]
                )
                if standard
                else None,
            )
            if detector and (detect_all or stacks[i] == "sstack"):
                bx = json.loads(boxes)
                row["abnormal_boxes"] = [dict(zip(("x1", "y1", "x2", "y2", "score"), b, strict=True)) for b in bx]
                row["n_abnormal"] = len(bx)
        else:
            row.update(status="error", error=error, error_kind="transient" if transient else "permanent")
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=REPORT_SCHEMA)


def _check_models(cfg: ScoreConfig) -> tuple[dict, dict | None]:
    """The artifacts' configs (no weights read): each must exist and be of the right kind."""
    from . import models

    clf_cfg = models.read_config(cfg.classifier, cfg.endpoint_url)
    if clf_cfg.get("kind") != "classifier":
        raise ValueError(f"--classifier {cfg.classifier}: a {clf_cfg.get('kind')} artifact, not a classifier")
    det_cfg = None
    if cfg.detector:
        det_cfg = models.read_config(cfg.detector, cfg.endpoint_url)
        if det_cfg.get("kind") != "detector":
            raise ValueError(f"--detector {cfg.detector}: a {det_cfg.get('kind')} artifact, not a detector")
    return clf_cfg, det_cfg


def _plan(cfg: ScoreConfig, versions: tuple[str, str], summary: ScoreSummary) -> list[ArchiveObject]:
    """The objects to score: image-named objects of the archive not yet committed for these models.
    Objects whose names are not images (annotations, notes, checksums) are counted and left out."""
    out_uri = cfg.out if storage.is_s3(cfg.out) else os.path.abspath(cfg.out)
    listed = list_archive(cfg.archive, cfg.endpoint_url, exclude=out_uri)
    summary.listed = len(listed)
    objs = [o for o in listed if images.is_image_name(o.key)]
    summary.ignored = len(listed) - len(objs)
    if summary.ignored:
        log.info("ignoring %d objects whose names are not images", summary.ignored)
    done = _done_keys(cfg.out, cfg.endpoint_url, versions)
    todo = [o for o in objs if (o.uri, o.version) not in done]
    summary.skipped = len(objs) - len(todo)
    log.info(
        "%s: %d objects, %d already in the report, %d to score (run %s)",
        cfg.archive,
        len(objs),
        summary.skipped,
        len(todo),
        summary.run_id,
    )
    return todo


def _pipeline(cfg: ScoreConfig, todo: list[ArchiveObject], stacks: list[str], data_cfg: dict, det_size: int | None):
    """One streaming Ray Data execution: read + decode + preprocess tasks → the model actor pool."""
    import ray

    table = pa.table(
        {
            "row": pa.array(range(len(todo)), pa.int64()),
            "uri": [o.uri for o in todo],
            "key": [o.key for o in todo],
            "stack": stacks,
        }
    )
    blocks = [table.slice(i, cfg.decode_batch) for i in range(0, table.num_rows, cfg.decode_batch)]
    ds = ray.data.from_arrow(blocks)
    ds.context.op_resource_reservation_enabled = False
    ds.context.execution_options.preserve_order = True
    ds = ds.map_batches(
        _preprocess,
        batch_size=cfg.decode_batch,
        batch_format="numpy",
        num_cpus=1,
        fn_kwargs={
            "cls_cfg": data_cfg,
            "det_size": det_size,
            "detect_all": cfg.detect_all_stacks,
            "endpoint_url": cfg.endpoint_url,
            "max_pixels": cfg.max_pixels,
            "read_attempts": cfg.read_attempts,
            "retry_delay": cfg.retry_delay,
        },
    )
    return ds.map_batches(
        ModelActor,
        fn_constructor_kwargs={
            "classifier": cfg.classifier,
            "detector": cfg.detector,
            "endpoint_url": cfg.endpoint_url,
        },
        batch_size=cfg.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.concurrency),
        num_gpus=cfg.gpus_per_actor or None,
        num_cpus=0 if cfg.gpus_per_actor else 1,
    )


@dataclass
class _Committer:
    """Turns results into report parts, one chunk at a time, each published with its manifest."""

    cfg: ScoreConfig
    todo: list[ArchiveObject]
    stacks: list[str]
    classes: list[str]
    versions: tuple[str, str]
    summary: ScoreSummary
    fields: KeyFields | None = None

    def commit(self, c: int, results: dict[int, tuple]) -> None:
        cfg, size = self.cfg, self.cfg.chunk_size
        lo, hi = c * size, min((c + 1) * size, len(self.todo))
        local = {i - lo: results.pop(i) for i in range(lo, hi) if i in results}
        table = _rows_for_chunk(
            self.todo[lo:hi],
            local,
            self.stacks[lo:hi],
            self.classes,
            self.versions,
            self.summary.run_id,
            bool(cfg.detector),
            cfg.detect_all_stacks,
            self.fields,
        )
        name = f"{self.summary.run_id}-{c:05d}"
        meta = {
            "run_id": self.summary.run_id,
            "archive": cfg.archive,
            "classifier_version": self.versions[0],
            "detector_version": self.versions[1],
            "config": asdict(cfg),
        }
        self.summary.parts.append(_publish(table, cfg.out, cfg.endpoint_url, name, meta))
        n_err = table.num_rows - sum(1 for v in table.column("status").to_pylist() if v == "ok")
        self.summary.scored += table.num_rows
        self.summary.errors += n_err
        self.summary.no_vessel += table.column("vessel").null_count
        log.info("committed %s: %d rows (%d errors), %d/%d objects", name, table.num_rows, n_err, hi, len(self.todo))

    def consume(self, scored) -> None:
        """Commit each chunk as soon as all its rows are back; the driver holds one chunk's results
        (probabilities, boxes, error texts). Rows that never come back become error rows."""
        n_chunks = -(-len(self.todo) // self.cfg.chunk_size)
        results: dict[int, tuple] = {}
        next_chunk, received = 0, 0
        for b in scored.iter_batches(batch_size=None, batch_format="numpy"):
            cols = (b["row"], b["ok"], b["error"], b["probs"], b["boxes"], b["confluence"], b["transient"])
            for r, ok, e, p, bx, cf, tr in zip(*cols, strict=True):
                results[int(r)] = (bool(ok), str(e), p, str(bx), float(cf), bool(tr))
                received += 1
            while next_chunk < n_chunks and received >= min((next_chunk + 1) * self.cfg.chunk_size, len(self.todo)):
                self.commit(next_chunk, results)
                next_chunk += 1
        while next_chunk < n_chunks:
            self.commit(next_chunk, results)
            next_chunk += 1


def score_archive(cfg: ScoreConfig, connect=None) -> ScoreSummary:
    """Score every object of ``cfg.archive`` not yet in the report at ``cfg.out``; see the module doc.

    ``connect`` (optional) is called once the report location, the models and the archive listing
    have been checked and there is work to do: the CLI starts or joins Ray there, so a bad bucket,
    credential or endpoint fails in seconds without starting anything."""
    cfg.validate()
    t0 = time.perf_counter()
    run_id = cfg.run_id or f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"
    summary = ScoreSummary(run_id=run_id)
    # everything that can fail fast does so before any work: report location, models, listing
    check_writable(cfg.out, cfg.endpoint_url)
    if cfg.run_id and _run_id_used(cfg.out, cfg.endpoint_url, run_id):
        raise ValueError(f"--run-id {run_id}: already used in the report {cfg.out}; give a new one")
    clf_cfg, det_cfg = _check_models(cfg)
    fields = KeyFields(cfg.key_pattern, cfg.metadata, cfg.endpoint_url)
    versions = (clf_cfg["version"], det_cfg["version"] if det_cfg else "")
    todo = _plan(cfg, versions, summary)
    if todo:
        if connect is not None:
            connect()
        default_stack = clf_cfg.get("stack", "sstack")
        stacks = [stack_of(o.key, default_stack) if cfg.stack == "auto" else cfg.stack for o in todo]
        data_cfg = {**clf_cfg["data"], "endpoint_url": None}
        det_size = int(det_cfg["image_size"]) if det_cfg else None
        committer = _Committer(cfg, todo, stacks, list(clf_cfg["classes"]), versions, summary, fields)
        committer.consume(_pipeline(cfg, todo, stacks, data_cfg, det_size))
    summary.seconds = time.perf_counter() - t0
    if summary.no_vessel:
        log.warning(
            "%d of %d rows got no vessel from their key: give --metadata or --key-pattern for per-vessel plots",
            summary.no_vessel,
            summary.scored,
        )
    return summary
