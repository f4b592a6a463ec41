"""Batch scoring of archived production images into a Parquet report, exactly once.

Pipeline, one streaming Ray Data execution per window of the archive, every stack in it::

    list (boto3 paginator / local walk) → read bytes → decode to uint8 (→ resize)   [CPU tasks]
        → model actors: (resize →) normalise → classifier (+ detector, segmenter)     [actor pool, GPUs optional]
        → report rows → one Parquet part per chunk, published atomically

Report layout (a local folder or an ``s3://`` prefix)::

    REPORT/parts/<run id>-<chunk>.parquet      published parts (what a plain Parquet reader of REPORT sees)
    REPORT/_commits/<run id>-<chunk>.json      completion manifests
    REPORT/_staging/...                        parts being written; never read
    REPORT/_cells/<run id>-<chunk>.parquet     with --segmenter: one row per cell of that part's images
    REPORT/_potency/current.parquet            with --potency: predicted potency per vessel-day

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

With a segmenter (``--segmenter``), each row of the stack it serves also carries the morphology of
its predicted cell and nucleus masks (:mod:`msc_ray.morphology`): cell count, density, mask-based
confluence (``mask_confluence_pct``), the share of flattened cells, median and IQR of the cell shapes,
alignment. The per-cell table of a part is written under ``_cells/`` before the part's manifest and
read (:func:`read_cells`) only for committed parts, so cells are in it exactly once, like the rows.
A potency model (``--potency``) is per vessel-day, and a vessel-day's images may arrive over several
parts and runs: after each run the potency of every vessel-day in the report is predicted again from
all its committed rows and written to ``_potency/current.parquet`` (:func:`read_potency`).
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
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import VIEWS, images, inference, morphology, storage

log = logging.getLogger(__name__)

KEY_PATTERN = re.compile(r"(?P<vessel>[A-Za-z0-9]+)_d(?P<day>\d+)(?:_(?P<position>[A-Za-z0-9]+))?")
STACK_CHOICES = ("auto", "sstack", "mstack")
PREPROCESS_CHOICES = ("auto", "tasks", "actor")

BOX_TYPE = pa.struct(
    [
        ("x1", pa.float32()),
        ("y1", pa.float32()),
        ("x2", pa.float32()),
        ("y2", pa.float32()),
        ("score", pa.float32()),
    ]
)
# morphology column of a report row for each per-image feature (the classifier's estimate is
# confluence_pct; the masks' is mask_confluence_pct)
MORPH_FIELDS = {c: "mask_confluence_pct" if c == "confluence_pct" else c for c in morphology.IMAGE_COLUMNS}
MORPH_SCHEMA = [(f, pa.int32() if f == "cell_count" else pa.float32()) for f in MORPH_FIELDS.values()]
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
        *MORPH_SCHEMA,
        ("vessel", pa.string()),
        ("day", pa.int32()),
        ("position", pa.string()),
        ("classifier_version", pa.string()),
        ("detector_version", pa.string()),
        ("segmenter_version", pa.string()),
        ("run_id", pa.string()),
        ("scored_at", pa.timestamp("ms", tz="UTC")),
    ]
)
ID_FIELDS = [("uri", pa.string()), ("key", pa.string()), ("version", pa.string()), ("stack", pa.string())]
CELL_SCHEMA = pa.schema(
    [
        *ID_FIELDS,
        ("vessel", pa.string()),
        ("day", pa.int32()),
        ("position", pa.string()),
        ("segmenter_version", pa.string()),
        ("run_id", pa.string()),
        *(
            (c, pa.int32() if c == "cell_id" else pa.bool_() if c in ("touches_border", "flattened") else pa.float32())
            for c in morphology.CELL_COLUMNS
        ),
    ]
)
POTENCY_SCHEMA = pa.schema(
    [
        ("vessel", pa.string()),
        ("day", pa.int32()),
        ("n_images", pa.int32()),
        ("potency", pa.float32()),
        ("potency_version", pa.string()),
        ("segmenter_version", pa.string()),
        ("run_id", pa.string()),
        ("computed_at", pa.timestamp("ms", tz="UTC")),
    ]
)


@dataclass(frozen=True)
class ScoreConfig:
    archive: str
    # one artifact per stack: "STACK=ARTIFACT" entries, or a bare ARTIFACT for the stack it was trained on
    classifier: str | tuple[str, ...]
    out: str
    detector: str | None = None
    segmenter: str | None = None  # cell/nucleus masks → morphology columns and the per-cell table
    potency: str | None = None  # potency per vessel-day from the morphology (needs the segmenter)
    # auto: from a "sstack"/"mstack" folder in the key, else the stack of the only classifier given
    stack: str = "auto"
    detect_all_stacks: bool = False  # the detector and segmenter serve the stack they were trained on
    batch_size: int = 0  # images per model call; 0: 256 on a GPU actor, 32 on a CPU one
    decode_batch: int = 32  # images per decode task
    concurrency: int = 0  # model actors; 0: from the cluster (see actor_plan)
    gpus_per_actor: float = 0.0
    # where decoded images are equalised and resized to each model's input: "tasks" (the CPU decode
    # tasks), "actor" (the model actor, on its device) or "auto" (the actor when it has a GPU)
    preprocess_on: str = "auto"
    chunk_size: int = 2000  # objects per committed part
    window: int = 50_000  # objects listed, planned and scored at a time (the driver's memory bound)
    run_id: str = ""
    endpoint_url: str | None = None
    max_pixels: int = images.DEFAULT_MAX_PIXELS
    read_attempts: int = 4  # tries per object on a store error, with exponential backoff from retry_delay
    retry_delay: float = 1.0
    key_pattern: str | None = None  # regex with named groups vessel, day, position, searched in the key
    # test-time views of the classifiers (engine.view_mean): 0 keeps each artifact's own; another count
    # is a different computation, so rows record it in classifier_version ("<version>+views<N>")
    views: int = 0
    metadata: str | None = None  # CSV or Parquet table: key, and vessel / day / position columns

    def validate(self) -> None:
        if self.run_id and not RUN_ID.fullmatch(self.run_id):
            raise ValueError(
                f"--run-id {self.run_id!r}: a run id is a name (letters, digits, '-', '_', '.'; "
                "not starting with '.'), never a path"
            )
        if self.key_pattern is not None:
            _compile_key_pattern(self.key_pattern)
        if self.potency and not self.segmenter:
            raise ValueError("--potency: the potency model reads morphology, so it needs --segmenter")
        if self.preprocess_on not in PREPROCESS_CHOICES:
            raise ValueError(
                f"--preprocess-on must be one of {', '.join(PREPROCESS_CHOICES)}, got {self.preprocess_on!r}"
            )
        if self.stack not in STACK_CHOICES:
            raise ValueError(f"--stack must be one of {', '.join(STACK_CHOICES)}, got {self.stack!r}")
        for name in ("decode_batch", "chunk_size", "read_attempts", "window"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        for name in ("batch_size", "concurrency"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, or 0 to choose from the cluster")
        if self.gpus_per_actor < 0:
            raise ValueError("--gpus-per-actor must be 0 (CPU actors) or more")
        if self.views and self.views not in VIEWS:
            raise ValueError(f"--views {self.views}: 0 (each classifier's own), or one of {', '.join(map(str, VIEWS))}")
        classifier_entries(self.classifier)

    def entries(self) -> list[tuple[str | None, str]]:
        return classifier_entries(self.classifier)

    def actor_plan(self, cluster: dict[str, float]) -> tuple[int, int]:
        """(model actors, images per model call) for a cluster's resources (``ray.cluster_resources()``);
        a setting above 0 is kept. Actors: on GPUs as many as the cluster's GPUs hold at
        ``gpus_per_actor`` each (their decode tasks take every CPU); on CPUs one per core, less a
        quarter of the cores (at least one) kept for decoding — a model call costs far more CPU than
        decoding its images (bench_score: about 13 ms against 1.5 ms an image for a ResNet-18 at 128 px
        from 256-px PNGs). Batch: 256 on a GPU (the bare bfloat16 forward's measured best), 32 on a CPU."""
        cpus, gpus = int(cluster.get("CPU", 1)), float(cluster.get("GPU", 0))
        if self.gpus_per_actor > 0:
            actors = max(1, int(gpus // self.gpus_per_actor))
        else:
            actors = max(1, cpus - max(1, cpus // 4))
        batch = 256 if self.gpus_per_actor > 0 else 32
        return self.concurrency or actors, self.batch_size or batch

    @property
    def fits_on_actor(self) -> bool:
        return self.preprocess_on == "actor" or (self.preprocess_on == "auto" and self.gpus_per_actor > 0)


def classifier_entries(spec: str | tuple[str, ...] | list[str]) -> list[tuple[str | None, str]]:
    """``--classifier`` values → ``[(stack or None, artifact URI)]``. ``sstack=ART`` names the stack;
    a bare ``ART`` serves the stack its config names."""
    items = [spec] if isinstance(spec, str) else list(spec)
    if not items:
        raise ValueError("--classifier: give at least one classifier artifact")
    out = []
    for item in items:
        head, sep, uri = str(item).partition("=")
        if sep and head in STACK_CHOICES[1:]:
            out.append((head, uri))
        elif sep and "/" not in head and ":" not in head:
            raise ValueError(f"--classifier {item}: unknown stack {head!r} (sstack or mstack)")
        else:
            out.append((None, str(item)))
    return out


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
    cells: int = 0  # rows of the per-cell table (with a segmenter)
    potency_days: int = 0  # vessel-days with a predicted potency (with a potency model)


# --------------------------------------------------------------------------------------------------
# Listing
# --------------------------------------------------------------------------------------------------


def _split_s3(uri: str) -> tuple[str, str]:
    rest = uri[len("s3://") :]
    bucket, _, prefix = rest.partition("/")
    return bucket, prefix.strip("/")


def iter_archive(archive: str, endpoint_url: str | None = None, exclude: str | None = None) -> Iterator[ArchiveObject]:
    """Every object under ``archive`` with what identifies its version, streamed (an S3 listing page or
    a folder at a time; S3 in key order, folders and names sorted locally). Objects under ``exclude``
    (the report, when it lies inside the archive) are left out."""
    prefix_out = exclude.rstrip("/") + "/" if exclude else None
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
                    uri = f"s3://{bucket}/{key}"
                    if key.endswith("/") or (prefix_out and uri.startswith(prefix_out)):
                        continue
                    rel = key[len(prefix) + 1 :] if prefix else key
                    yield ArchiveObject(uri, rel, int(obj["Size"]), obj["ETag"].strip('"'))
        except Exception as exc:  # botocore ClientError, EndpointConnectionError, NoCredentialsError, ...
            raise storage.StorageError(f"cannot list {archive}: {_s3_reason(exc)}") from None
        return
    root = os.path.abspath(archive)
    if not os.path.isdir(root):
        raise ValueError(f"{archive}: no such folder")
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fn in sorted(filenames):
            path = os.path.join(dirpath, fn)
            if prefix_out and path.startswith(prefix_out):
                continue
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            try:
                st = os.stat(path)
            except OSError as exc:  # a dangling link, a link loop: listed, it becomes an error row
                yield ArchiveObject(path, rel, -1, f"unreadable:{exc.errno}")
                continue
            yield ArchiveObject(path, rel, st.st_size, f"{st.st_size}:{st.st_mtime_ns}")


def list_archive(archive: str, endpoint_url: str | None = None, exclude: str | None = None) -> list[ArchiveObject]:
    """:func:`iter_archive` as a list sorted by key (for small archives and tests)."""
    return sorted(iter_archive(archive, endpoint_url, exclude), key=lambda o: o.key)


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
# One writer per report
# --------------------------------------------------------------------------------------------------

LEASE_SECONDS = 120.0  # a lease not renewed for this long belongs to a run that is gone
LEASE_RENEW = 20.0


class ReportLease:
    """A run's claim on a report: ``REPORT/_leases/<run id>.json`` (run id, host, pid, start and renewal
    times), renewed every ``LEASE_RENEW`` seconds while the run lasts and removed when it ends.

    A run writes its lease, then lists the others. A live one (renewed within ``LEASE_SECONDS``; on this
    host, also its process still running) that started earlier — or at the same time with a smaller run
    id — wins: this run removes its lease and stops at start with one line naming that run. Two runs
    started together therefore end with one writer, never two scoring the same objects into duplicate
    rows. A lease left by a killed run stops counting when its process is gone (same host) or after
    ``LEASE_SECONDS``."""

    def __init__(self, out: str, run_id: str, endpoint_url: str | None = None):
        import socket

        self.loc, self.out, self.run_id = _report_loc(out, endpoint_url), out, run_id
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.started = time.time()
        self._stop = None

    def _path(self, run_id: str) -> str:
        return self.loc.join("_leases", f"{run_id}.json")

    def write(self) -> None:
        body = {"run_id": self.run_id, "host": self.host, "pid": self.pid, "started": self.started}
        body["renewed"] = time.time()
        if self.loc.scheme == "file":
            self.loc.fs.create_dir(self.loc.join("_leases"), recursive=True)
        with self.loc.fs.open_output_stream(self._path(self.run_id)) as fh:
            fh.write(json.dumps(body).encode())

    def _live(self, lease: dict) -> bool:
        if time.time() - float(lease.get("renewed", 0)) > LEASE_SECONDS:
            return False
        if lease.get("host") == self.host:
            try:
                os.kill(int(lease["pid"]), 0)
            except ProcessLookupError:
                return False
            except (PermissionError, ValueError, KeyError):
                pass
        return True

    def check(self) -> None:
        """Raise (after removing this run's lease) when another live run holds the report."""
        import pyarrow.fs as pafs

        infos = self.loc.fs.get_file_info(pafs.FileSelector(self.loc.join("_leases"), allow_not_found=True))
        mine = (self.started, self.run_id)
        for info in infos:
            if info.base_name == f"{self.run_id}.json" or not info.base_name.endswith(".json"):
                continue
            try:
                with self.loc.fs.open_input_stream(info.path) as fh:
                    other = json.loads(fh.read())
            except (OSError, ValueError):
                continue  # removed meanwhile, or half-written: its writer checks again
            if self._live(other) and (float(other["started"]), str(other["run_id"])) < mine:
                self.release()
                when = dt.datetime.fromtimestamp(float(other["started"]), dt.timezone.utc)
                raise ValueError(
                    f"report {self.out} is being written by run {other['run_id']} (host {other.get('host')}, "
                    f"started {when:%Y-%m-%d %H:%M:%S} UTC); wait for it to end (a lease of a run that died "
                    f"lapses after {LEASE_SECONDS:.0f}s)"
                )

    def acquire(self) -> ReportLease:
        import threading

        self.write()
        self.check()
        self._stop = threading.Event()

        def renew() -> None:
            while not self._stop.wait(LEASE_RENEW):
                try:
                    self.write()
                except OSError as exc:  # the store is down: the run finds out at its next commit
                    log.warning("cannot renew the report lease: %s", storage.describe_error(exc))

        threading.Thread(target=renew, name="report-lease", daemon=True).start()
        return self

    def release(self) -> None:
        if self._stop is not None:
            self._stop.set()
        try:
            self.loc.fs.delete_file(self._path(self.run_id))
        except OSError:
            pass


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
    schema = REPORT_SCHEMA if columns is None else pa.schema([REPORT_SCHEMA.field(c) for c in columns])
    tables = [_read_part(loc, loc.join("parts", m["part"]), schema) for m in committed(out, endpoint_url)]
    if not tables:
        return schema.empty_table()
    table = pa.concat_tables(tables)
    return table if columns is not None else _current(table)


def _read_part(loc, path: str, schema: pa.Schema) -> pa.Table:
    """A committed part with ``schema``'s columns; columns a part written by an earlier version lacks
    (say the morphology) come back null."""
    have = set(pq.read_schema(path, filesystem=loc.fs).names)
    t = pq.read_table(path, filesystem=loc.fs, columns=[c for c in schema.names if c in have])
    for f in schema:
        if f.name not in have:
            t = t.append_column(f.name, pa.nulls(t.num_rows, f.type))
    return t.select(schema.names).cast(schema)


def read_cells(out: str, endpoint_url: str | None = None, columns: list[str] | None = None) -> pa.Table:
    """The per-cell table of a report (:data:`CELL_SCHEMA`, or ``columns`` of it): the cells of
    committed parts only."""
    loc = _report_loc(out, endpoint_url)
    schema = CELL_SCHEMA if columns is None else pa.schema([CELL_SCHEMA.field(c) for c in columns])
    names = [m["cells"] for m in committed(out, endpoint_url) if m.get("cells")]
    tables = [pq.read_table(loc.join("_cells", n), filesystem=loc.fs, columns=schema.names).cast(schema) for n in names]
    return pa.concat_tables(tables) if tables else schema.empty_table()


def read_potency(out: str, endpoint_url: str | None = None) -> pa.Table | None:
    """The predicted potency per vessel-day (:data:`POTENCY_SCHEMA`), or None without one."""
    import pyarrow.fs as pafs

    loc = _report_loc(out, endpoint_url)
    path = loc.join("_potency", "current.parquet")
    if loc.fs.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    return pq.read_table(path, filesystem=loc.fs)


def _current(table: pa.Table) -> pa.Table:
    """The report without transient error rows that a later run has replaced (a row of the same
    object version and models that is not a transient error): one row per object once it has been
    read. A plain Parquet reader sees those rows too; filter ``error_kind != 'transient'`` there."""
    import pyarrow.compute as pc

    transient = pc.fill_null(pc.equal(table["error_kind"], "transient"), False)
    if not pc.any(transient).as_py():
        return table
    versions = ("uri", "version", "classifier_version", "detector_version", "segmenter_version")
    key = pc.binary_join_element_wise(*(pc.fill_null(table[c], "") for c in versions), "\x00")
    replaced = pc.is_in(key, value_set=pc.unique(pc.filter(key, pc.invert(transient))))
    return table.filter(pc.invert(pc.and_(transient, replaced)))


class DoneKeys:
    """What the report already holds, compactly: a sorted array of 64-bit digests of (URI, version,
    classifier, detector and segmenter versions) of its rows, transient error rows left out (those objects
    are scored again). 8 bytes per row, read one committed part at a time, so a report of ten million
    rows costs the driver about 80 MB. A digest collision (about 5 in a million for ten million rows
    looked up against ten million) would skip one object as done."""

    def __init__(self, digests: np.ndarray):
        self.digests = np.sort(np.asarray(digests, np.uint64))

    @staticmethod
    def digest(uri: str, version: str, clf: str, det: str, seg: str = "") -> int:
        import hashlib

        text = f"{uri}\x00{version}\x00{clf}\x00{det}" + (f"\x00{seg}" if seg else "")
        h = hashlib.blake2b(text.encode(), digest_size=8)
        return int.from_bytes(h.digest(), "little")

    @classmethod
    def load(cls, out: str, endpoint_url: str | None = None) -> DoneKeys:
        loc = _report_loc(out, endpoint_url)
        cols = ["uri", "version", "classifier_version", "detector_version", "segmenter_version", "error_kind"]
        schema = pa.schema([REPORT_SCHEMA.field(c) for c in cols])
        parts = []
        for m in committed(out, endpoint_url):
            t = _read_part(loc, loc.join("parts", m["part"]), schema)
            rows = zip(*(t.column(c).to_pylist() for c in cols), strict=True)
            parts.append(
                np.fromiter(
                    (
                        cls.digest(u, v, c or "", d or "", s or "")
                        for u, v, c, d, s, kind in rows
                        if kind != "transient"
                    ),
                    np.uint64,
                )
            )
        return cls(np.concatenate(parts) if parts else np.zeros(0, np.uint64))

    def __len__(self) -> int:
        return len(self.digests)

    def contains(self, digests: np.ndarray) -> np.ndarray:
        digests = np.asarray(digests, np.uint64)
        if not len(self.digests):
            return np.zeros(len(digests), bool)
        i = np.minimum(np.searchsorted(self.digests, digests), len(self.digests) - 1)
        return self.digests[i] == digests


def _publish(
    table: pa.Table, out: str, endpoint_url: str | None, name: str, meta: dict, cells: pa.Table | None = None
) -> str:
    """Write a part under _staging, its cells (when given) under _cells, then its manifest, then move
    the part into parts/ (the commit: a part a reader can see always has its manifest, and cells are
    read only for committed parts)."""
    loc = _report_loc(out, endpoint_url)
    staging, final = loc.join("_staging", f"{name}.parquet"), loc.join("parts", f"{name}.parquet")
    try:
        for d in ("_staging", "parts", "_commits") + (("_cells",) if cells is not None else ()):
            loc.fs.create_dir(loc.join(d), recursive=True)
        pq.write_table(table, staging, filesystem=loc.fs)
        manifest = {**meta, "part": f"{name}.parquet", "rows": table.num_rows}
        if cells is not None:
            tmp_cells = loc.join("_staging", f"{name}.cells.parquet")
            pq.write_table(cells, tmp_cells, filesystem=loc.fs)
            loc.fs.move(tmp_cells, loc.join("_cells", f"{name}.parquet"))
            manifest.update(cells=f"{name}.parquet", cell_rows=cells.num_rows)
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


def update_potency(cfg: ScoreConfig, sm: StackModels, run_id: str) -> int:
    """Predict the potency of every vessel-day of the report from all its committed rows measured by
    this segmenter (an object scored again by a newer classifier counts once: its latest row), and
    replace ``_potency/current.parquet`` (written under ``_staging``, then moved). Returns the number
    of vessel-days."""
    from . import potency

    pcfg = potency.read_config(cfg.potency, cfg.endpoint_url)
    seg_version = sm.segmenter["version"]
    feats = [MORPH_FIELDS[f] for f in pcfg["features"]]
    cols = ["uri", "scored_at", "status", "vessel", "day", "segmenter_version", *feats]
    df = read_report(cfg.out, cfg.endpoint_url, columns=cols).to_pandas()
    df = df[(df["status"] == "ok") & (df["segmenter_version"] == seg_version) & df["vessel"].notna()]
    df = df.sort_values("scored_at").drop_duplicates("uri", keep="last")
    df = df.assign(day=df["day"].fillna(-1).astype(int)).rename(columns=dict(zip(feats, pcfg["features"], strict=True)))
    n = df.groupby(["vessel", "day"]).size().rename("n_images").reset_index()
    if len(df):
        agg = potency.predict(cfg.potency, df, cfg.endpoint_url).merge(n, on=["vessel", "day"])
    else:
        agg = n.assign(potency=np.zeros(0))
    out = pa.Table.from_pydict(
        {
            "vessel": agg["vessel"].astype(str).tolist(),
            "day": [None if d < 0 else int(d) for d in agg["day"]],
            "n_images": agg["n_images"].astype(int).tolist(),
            "potency": agg["potency"].astype(float).tolist(),
            "potency_version": [pcfg["version"]] * len(agg),
            "segmenter_version": [seg_version] * len(agg),
            "run_id": [run_id] * len(agg),
            "computed_at": [dt.datetime.now(dt.timezone.utc)] * len(agg),
        },
        schema=POTENCY_SCHEMA,
    )
    loc = _report_loc(cfg.out, cfg.endpoint_url)
    tmp = loc.join("_staging", f"potency-{run_id}.parquet")
    try:
        for d in ("_staging", "_potency"):
            loc.fs.create_dir(loc.join(d), recursive=True)
        pq.write_table(out, tmp, filesystem=loc.fs)
        loc.fs.move(tmp, loc.join("_potency", "current.parquet"))
    except OSError as exc:
        raise storage.StorageError(
            f"cannot write the potency table to {cfg.out} ({storage.describe_error(exc)}); the rows are "
            "committed: run again to predict it"
        ) from None
    log.info("potency predicted for %d vessel-days (model %s)", len(agg), pcfg["version"])
    return len(agg)


# --------------------------------------------------------------------------------------------------
# Ray Data stages
# --------------------------------------------------------------------------------------------------


def stack_of(key: str, default: str | None) -> str | None:
    parts = PurePosixPath(key).parts
    for s in ("sstack", "mstack"):
        if s in parts[:-1]:
            return s
    return default


def _preprocess(
    batch: dict,
    *,
    cls_cfgs: dict[str, dict],
    endpoint_url: str | None,
    max_pixels: int,
    det_size: int | None = None,
    det_stacks: tuple[str, ...] = (),
    seg_size: int | None = None,
    seg_stacks: tuple[str, ...] = (),
    read_attempts: int = 4,
    retry_delay: float = 1.0,
    on_actor: bool = False,
) -> dict:
    """CPU task: read and decode a block of objects (``row``, ``uri``, ``key``, ``stack``) to uint8; a bad
    object becomes an error row. ``cls_cfgs``: each stack's classifier ``data`` config; the detector
    (``det_size``) serves the rows of ``det_stacks``, the segmenter those of ``seg_stacks``.

    Out: ``row``, ``stack``, ``ok``, ``error``, ``transient``, ``shape`` (each image's original (H, W)),
    ``use_det``, ``use_seg`` and the images, uint8 throughout (no float copy on the CPU): fitted to each
    model's input here (:func:`msc_ray.inference.fit_u8` — channels, equalisation, resize;
    ``image_<stack>`` per stack's classifier, ``det_image``, ``seg_image``; zeros in the rows a model
    does not take), or, with ``on_actor`` (a GPU actor: the resize is cheaper there), as decoded in
    ``image``: one ``(N, C, H, W)`` array when the block's images share a size, else one ``(C, H, W)``
    array per row.

    A store error (throttling, 5xx, timeout, connection) is retried ``read_attempts`` times with
    exponential backoff and then becomes a *transient* error row, scored again by the next run; once
    one object of the block has used up its retries, the rest get one try each (the store is down: no
    retry storm). A corrupt or unsupported image, or an object that is gone, is *permanent*."""
    n = len(batch["uri"])
    decoded: list[np.ndarray | None] = [None] * n
    err = np.full(n, "", dtype=object)
    transient = np.zeros(n, bool)
    attempts = read_attempts
    for i in range(n):
        uri, key = str(batch["uri"][i]), str(batch["key"][i])
        try:
            decoded[i] = images.decode_u8(_read_retrying(uri, endpoint_url, attempts, retry_delay), key, max_pixels)
        except images.ImageError as exc:
            err[i] = str(exc)
        except Exception as exc:
            if _permanent(exc):  # deleted since it was listed, a dangling link or a link loop, a folder
                err[i] = f"{key}: cannot read ({exc.strerror or storage.describe_error(exc)})"
            else:  # the store failed for this object, after retries
                err[i] = f"{key}: cannot read ({storage.describe_error(exc)})"
                transient[i], attempts = True, 1
    ok = np.array([d is not None for d in decoded], bool)
    shape = np.array([d.shape[-2:] if d is not None else (0, 0) for d in decoded], np.int32).reshape(n, 2)
    stack = np.asarray(batch["stack"]).astype(str)
    use_det = ok & np.isin(stack, list(det_stacks)) if det_size else np.zeros(n, bool)
    use_seg = ok & np.isin(stack, list(seg_stacks)) if seg_size else np.zeros(n, bool)
    out = {
        "row": batch["row"],
        "stack": stack,
        "ok": ok,
        "error": err.astype(str),
        "transient": transient,
        "shape": shape,
        "use_det": use_det,
        "use_seg": use_seg,
    }
    if on_actor:
        out["image"] = _as_block(decoded)
        return out
    import torch

    fits = [(f"image_{st}", inference.classifier_config(c), ok & (stack == st)) for st, c in cls_cfgs.items()]
    if det_size:
        fits.append(("det_image", inference.box_model_config(det_size), use_det))
    if seg_size:
        fits.append(("seg_image", inference.box_model_config(seg_size), use_seg))
    for col, cfg, take in fits:
        arr = np.zeros((n, cfg.channels, cfg.size, cfg.size), np.uint8)
        for i in np.flatnonzero(take):
            arr[i] = inference.fit_u8(torch.from_numpy(decoded[i])[None], cfg)[0].numpy()
        out[col] = arr
    return out


def _as_block(decoded: list[np.ndarray | None]) -> np.ndarray:
    """Decoded uint8 images (None for an error row) → one ``(N, C, H, W)`` array when they share a
    size, else an object array of ``(C, H, W)`` arrays; gray images get 3 channels when the block
    holds colour ones, error rows are zeros."""
    good = [d for d in decoded if d is not None]
    c = max((d.shape[0] for d in good), default=1)
    imgs = [None if d is None else (np.repeat(d, c, axis=0) if d.shape[0] < c else d) for d in decoded]
    shapes = {d.shape for d in imgs if d is not None}
    if len(shapes) <= 1:
        shp = shapes.pop() if shapes else (c, 1, 1)
        block = np.zeros((len(imgs), *shp), np.uint8)
        for i, d in enumerate(imgs):
            if d is not None:
                block[i] = d
        return block
    out = np.empty(len(imgs), dtype=object)
    for i, d in enumerate(imgs):
        out[i] = d if d is not None else np.zeros((c, 1, 1), np.uint8)
    return out


def _permanent(exc: BaseException) -> bool:
    """An error that reading again will not cure: the object is gone, or a local entry is not a
    readable file (dangling link, link loop, folder)."""
    import errno

    return isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError)) or (
        isinstance(exc, OSError) and exc.errno in (errno.ELOOP, errno.ENAMETOOLONG)
    )


def _read_retrying(uri: str, endpoint_url: str | None, attempts: int, delay: float) -> bytes:
    """``uri``'s bytes in at most ``attempts`` tries, ``delay`` doubling between them. These are the
    only retries: the SDK's own are off here (one request per try), so a dead store costs ``attempts``
    requests per object, not ``attempts`` times the SDK's three with its backoff (1–2 s each)."""
    from . import data

    for attempt in range(attempts):
        try:
            return data.read_uri(uri, endpoint_url, max_attempts=1)
        except Exception as exc:
            if _permanent(exc) or attempt + 1 >= attempts:
                raise
            log.warning("retrying %s in %.1fs: %s", uri, delay * 2**attempt, storage.describe_error(exc))
            time.sleep(delay * 2**attempt)
    raise AssertionError("unreachable")


class ModelActor:
    """Holds each stack's classifier (and the detector, the segmenter) for the life of the actor
    (:mod:`msc_ray.inference`); turns uint8 image batches into predictions. The last preparation steps
    run here, on the actor's device (:class:`msc_ray.inference.ScoringInput`): to float, normalise,
    channels-last, and — for full-size images (``on_actor``) — channels, equalisation and resize. On a
    GPU the batch moves there as uint8 from pinned memory, the classifiers' weights are bfloat16 and
    the detector and segmenter run under bfloat16 autocast."""

    def __init__(
        self,
        classifiers: dict[str, str],
        detector: str | None,
        endpoint_url: str | None,
        segmenter: str | None = None,
        views: dict[str, int] | None = None,
    ):
        dev = inference.default_device()
        self.clfs = {st: inference.Classifier(uri, endpoint_url, dev) for st, uri in classifiers.items()}
        for st, n in (views or {}).items():  # the run's --views where it overrides the artifact's
            self.clfs[st].views = n
        if dev.type == "cuda":
            for clf in self.clfs.values():
                clf.to_bfloat16()
        self.clf_in = {st: inference.ScoringInput(clf.data_cfg, dev) for st, clf in self.clfs.items()}
        self.width = max(len(clf.classes) for clf in self.clfs.values())
        self.det = inference.Detector(detector, endpoint_url, dev) if detector else None
        self.seg = inference.Segmenter(segmenter, endpoint_url, dev) if segmenter else None
        self.det_in = inference.ScoringInput(inference.box_model_config(self.det.size), dev) if self.det else None
        self.seg_in = inference.ScoringInput(inference.box_model_config(self.seg.size), dev) if self.seg else None

    def __call__(self, batch: dict) -> dict:
        """Batch in (:func:`_preprocess`): ``row``, ``stack``, ``ok``, ``error``, ``transient``,
        ``shape``, ``use_det``, ``use_seg``, and ``image_<stack>`` [+ ``det_image``] [+ ``seg_image``]
        or full-size ``image`` for all. Batch out: ``row``, ``ok``, ``error``, ``probs`` (N, K)
        calibrated (K: the widest classifier's classes; a row uses its own classifier's first ones),
        ``boxes`` (JSON text per row: ``[[x1, y1, x2, y2, score], ...]`` in the original image's
        pixels), ``morph`` and ``cells`` (JSON text per row: the image's morphology and its cells,
        :func:`msc_ray.morphology.features` of the predicted masks)."""
        n = len(batch["row"])
        ok = np.asarray(batch["ok"], bool)
        stack = np.asarray(batch["stack"]).astype(str)
        shape = np.asarray(batch["shape"]).reshape(n, 2)
        probs = np.zeros((n, self.width), np.float32)
        conf = np.full(n, np.nan, np.float32)  # the confluence output (a fraction), when the model has one
        boxes = ["[]"] * n

        def rows(col: str, at: np.ndarray):
            arr = batch[col] if col in batch else batch["image"]
            return arr[at]

        for st, clf in self.clfs.items():
            idx = np.flatnonzero(ok & (stack == st))
            if len(idx):
                p, conf[idx] = clf(self.clf_in[st](rows(f"image_{st}", idx)))
                probs[idx, : p.shape[1]] = p
        didx = np.flatnonzero(np.asarray(batch["use_det"], bool))
        if self.det is not None and len(didx):
            x = self.det_in(rows("det_image", didx))
            scales = [np.array([w / self.det.size, h / self.det.size], np.float32) for h, w in shape[didx]]
            for i, bx in zip(didx, self.det(x, scales), strict=True):
                boxes[i] = json.dumps(bx)
        morph, cells = ["{}"] * n, ["[]"] * n
        sidx = np.flatnonzero(np.asarray(batch["use_seg"], bool))
        if self.seg is not None and len(sidx):
            maps = self.seg(self.seg_in(rows("seg_image", sidx)), list(shape[sidx]))
            for i, (cm, nm) in zip(sidx, maps, strict=True):
                found, img = morphology.features(cm.astype(np.int64), nm.astype(np.int64))
                morph[i], cells[i] = json.dumps(img), json.dumps(found)
        return {
            "row": batch["row"],
            "ok": ok,
            "error": batch["error"],
            "transient": batch["transient"],
            "probs": probs,
            "confluence": conf,
            "boxes": np.array(boxes, dtype=object).astype(str),
            "morph": np.array(morph, dtype=object).astype(str),
            "cells": np.array(cells, dtype=object).astype(str),
        }


# --------------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StackModels:
    """The classifier of each stack (URI and config) and the detector's config: which model versions
    a row of a given stack is scored with."""

    classifiers: dict[str, tuple[str, dict]]
    detector: dict | None = None
    detect_all: bool = False
    segmenter: dict | None = None

    def versions(self, stack: str | None) -> tuple[str, str, str]:
        """(classifier, detector, segmenter version) of a row of this stack; "" where none applies.
        The detector and the segmenter serve the stack they were trained on (sstack unless their
        config says otherwise), every stack with ``detect_all``."""
        clf = self.classifiers.get(stack or "")

        def serves(cfg: dict | None) -> str:
            return cfg["version"] if cfg and (self.detect_all or stack == (cfg.get("stack") or "sstack")) else ""

        return (clf[1]["version"] if clf else "", serves(self.detector), serves(self.segmenter))

    def missing(self, key: str, stack: str | None) -> str:
        if stack is None:
            return f"{key}: stack unknown (no sstack/ or mstack/ folder in the key); give --stack"
        return f"{key}: no classifier for stack {stack} (give --classifier {stack}=ARTIFACT)"


def _rows_for_chunk(
    objs: list[ArchiveObject],
    results: dict[int, tuple],
    stacks: list[str | None],
    models: StackModels,
    run_id: str,
    fields: KeyFields | None = None,
) -> tuple[pa.Table, pa.Table | None]:
    """Report rows of one chunk, and its per-cell table when a segmenter is in use:
    ``results[i] = (ok, error, probs, boxes_json, confluence, transient, morph_json, cells_json)`` for
    object ``i`` (confluence: the model's regressed fraction, NaN when it has no such output; morph: the
    image's morphology, cells: its cells, JSON). An object with no result (a lost task or actor) is a
    transient error row."""
    now = dt.datetime.now(dt.timezone.utc)
    fields = fields or KeyFields()
    rows, cells = [], []
    for i, o in enumerate(objs):
        vessel, day, position = fields(o.key)
        clf_version, det_version, seg_version = models.versions(stacks[i])
        row = {
            "uri": o.uri,
            "key": o.key,
            "size": o.size,
            "version": o.version,
            "stack": stacks[i],
            "vessel": vessel,
            "day": day,
            "position": position,
            "classifier_version": clf_version or None,
            "detector_version": det_version or None,
            "segmenter_version": seg_version or None,
            "run_id": run_id,
            "scored_at": now,
        }
        ok, error, p, boxes, regressed, transient, morph, found = results.get(
            i, (False, f"{o.key}: not scored (its task or actor was lost)", None, "[]", np.nan, True, "{}", "[]")
        )
        if ok:
            classes = list(models.classifiers[stacks[i]][1]["classes"])
            p = p[: len(classes)]  # a run's probabilities are as wide as its widest classifier
            row.update(
                status="ok",
                error=None,
                classes=classes,
                probabilities=[float(v) for v in p],
                **inference.interpret(classes, p, regressed),
            )
            if det_version:
                bx = json.loads(boxes)
                row["abnormal_boxes"] = [dict(zip(("x1", "y1", "x2", "y2", "score"), b, strict=True)) for b in bx]
                row["n_abnormal"] = len(bx)
            if seg_version:
                row.update({MORPH_FIELDS[k]: v for k, v in json.loads(morph).items()})
                ids = {k: row[k] for k in CELL_SCHEMA.names if k in row}
                cells += [{**ids, **c} for c in json.loads(found)]
        else:
            row.update(status="error", error=error, error_kind="transient" if transient else "permanent")
        rows.append(row)
    table = pa.Table.from_pylist(rows, schema=REPORT_SCHEMA)
    return table, (pa.Table.from_pylist(cells, schema=CELL_SCHEMA) if models.segmenter else None)


def _check_models(cfg: ScoreConfig) -> StackModels:
    sm = stack_models(
        cfg.entries(), cfg.detector, cfg.endpoint_url, cfg.detect_all_stacks, cfg.segmenter, views=cfg.views
    )
    if cfg.potency:
        from . import potency

        pcfg = potency.read_config(cfg.potency, cfg.endpoint_url)
        unknown = [f for f in pcfg["features"] if f not in MORPH_FIELDS]
        if unknown:
            raise ValueError(
                f"--potency {cfg.potency}: trained on {', '.join(unknown)}, which scoring does not measure "
                "(train it on `msc-ray morphology` features)"
            )
    return sm


def stack_models(
    entries: list[tuple[str | None, str]],
    detector: str | None,
    endpoint_url: str | None,
    detect_all: bool = False,
    segmenter: str | None = None,
    views: int = 0,
) -> StackModels:
    """The artifacts' configs (no weights read): each must exist and be of the right kind, and one
    classifier per stack. ``entries``: :func:`classifier_entries`. ``views`` other than 0 and a
    classifier's own: its config carries them, and its version says so (``<version>+views<N>``)."""
    from . import models

    by_stack: dict[str, tuple[str, dict]] = {}
    for named, uri in entries:
        c = models.read_config(uri, endpoint_url)
        if c.get("kind") != "classifier":
            raise ValueError(f"--classifier {uri}: a {c.get('kind')} artifact, not a classifier")
        trained = c.get("stack")
        stack = named or trained or "sstack"
        if trained and trained != stack:
            raise ValueError(f"--classifier {stack}={uri}: trained on {trained} images, not {stack}")
        if stack in by_stack:
            raise ValueError(f"--classifier: two classifiers for {stack} ({by_stack[stack][0]} and {uri})")
        if views and views != inference.artifact_views(c):
            c = {**c, "views": views, "version": f"{c['version']}+views{views}"}
        by_stack[stack] = (uri, c)
    det_cfg = None
    if detector:
        det_cfg = models.read_config(detector, endpoint_url)
        if det_cfg.get("kind") != "detector":
            raise ValueError(f"--detector {detector}: a {det_cfg.get('kind')} artifact, not a detector")
    seg_cfg = None
    if segmenter:
        seg_cfg = models.read_config(segmenter, endpoint_url)
        if seg_cfg.get("kind") != "segmenter":
            raise ValueError(f"--segmenter {segmenter}: a {seg_cfg.get('kind')} artifact, not a segmenter")
    return StackModels(by_stack, det_cfg, detect_all, seg_cfg)


def _plan_windows(
    cfg: ScoreConfig, sm: StackModels, summary: ScoreSummary, done: DoneKeys
) -> Iterator[tuple[list[ArchiveObject], list[str | None]]]:
    """The objects to score and their stacks, a window of at most ``cfg.window`` objects at a time as
    the listing streams in: image-named objects not yet committed for their stack's models, grouped by
    stack within the window (the stacks with a classifier first, in the order given). The driver holds
    one window and the report's digests, never the whole archive. Objects whose names are not images
    (annotations, notes, checksums) are counted and left out."""
    out_uri = cfg.out if storage.is_s3(cfg.out) else os.path.abspath(cfg.out)
    default = next(iter(sm.classifiers)) if len(sm.classifiers) == 1 else None
    order = {s: n for n, s in enumerate(sm.classifiers)}
    window: list[ArchiveObject] = []
    stacks: list[str | None] = []

    def flush():
        digests = [DoneKeys.digest(o.uri, o.version, *sm.versions(st)) for o, st in zip(window, stacks, strict=True)]
        seen = done.contains(np.array(digests, np.uint64))
        keep = [i for i in range(len(window)) if not seen[i]]
        keep.sort(key=lambda i: (order.get(stacks[i], len(order)), window[i].key))
        summary.skipped += len(window) - len(keep)
        return [window[i] for i in keep], [stacks[i] for i in keep]

    for o in iter_archive(cfg.archive, cfg.endpoint_url, exclude=out_uri):
        summary.listed += 1
        if not images.is_image_name(o.key):
            summary.ignored += 1
            continue
        window.append(o)
        stacks.append(stack_of(o.key, default) if cfg.stack == "auto" else cfg.stack)
        if len(window) >= cfg.window:
            todo = flush()
            window, stacks = [], []
            if todo[0]:
                yield todo
    todo = flush()
    if todo[0]:
        yield todo
    if summary.ignored:
        log.info("ignored %d objects whose names are not images", summary.ignored)


def _pipeline(cfg: ScoreConfig, todo: list[ArchiveObject], rows: list[int], stacks: list[str], sm: StackModels):
    """One streaming Ray Data execution for every row with a classifier, whatever its stack: read +
    decode (+ fit to each model: the row's stack's input size, channels, equalisation) tasks → the
    actor pool holding every stack's classifier, the detector and the segmenter (one actor start-up per
    run, not one per stack)."""
    import ray

    here = sorted(set(stacks))
    det_stacks = tuple(st for st in here if sm.versions(st)[1])
    seg_stacks = tuple(st for st in here if sm.versions(st)[2])
    det_size = int(sm.detector["image_size"]) if det_stacks else None
    seg_size = int(sm.segmenter["image_size"]) if seg_stacks else None
    table = pa.table(
        {
            "row": pa.array(rows, pa.int64()),
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
        # 0: a decode worker is reused without limit (Ray's default for tasks), said explicitly so that the
        # decode tasks and a CPU model actor differ in their remote arguments: Ray Data fuses stages whose
        # arguments match, and the one model actor then decoded every block itself, one after another,
        # while the other cores idled (steady state 0.84 of the bare forward pass → 0.98; the plan is
        # checked by tests/test_score.py)
        max_calls=0,
        fn_kwargs={
            "cls_cfgs": {st: {**sm.classifiers[st][1]["data"], "endpoint_url": None} for st in here},
            "det_size": det_size,
            "det_stacks": det_stacks,
            "seg_size": seg_size,
            "seg_stacks": seg_stacks,
            "endpoint_url": cfg.endpoint_url,
            "max_pixels": cfg.max_pixels,
            "read_attempts": cfg.read_attempts,
            "retry_delay": cfg.retry_delay,
            "on_actor": cfg.fits_on_actor,
        },
    )
    actors, batch = cfg.actor_plan(ray.cluster_resources())
    log.info("%s: %d model actor(s), %d images per model call", "+".join(here), actors, batch)
    return ds.map_batches(
        ModelActor,
        fn_constructor_kwargs={
            "classifiers": {st: sm.classifiers[st][0] for st in here},
            "views": {st: inference.artifact_views(sm.classifiers[st][1]) for st in here},
            "detector": cfg.detector if det_size else None,
            "segmenter": cfg.segmenter if seg_size else None,
            "endpoint_url": cfg.endpoint_url,
        },
        batch_size=batch,
        batch_format="numpy",
        # CPU actors: a pool that Ray Data grows up to the plan while blocks wait for a model, and that
        # keeps going with fewer if a node is lost; GPU actors (no CPU reserved): the plan, fixed
        compute=(
            ray.data.ActorPoolStrategy(size=actors)
            if cfg.gpus_per_actor or cfg.concurrency
            else ray.data.ActorPoolStrategy(min_size=1, max_size=actors)
        ),
        num_gpus=cfg.gpus_per_actor or None,
        num_cpus=0 if cfg.gpus_per_actor else 1,
    )


def _scored(cfg: ScoreConfig, todo: list[ArchiveObject], stacks: list[str | None], sm: StackModels):
    """Result batches of every object whose stack has a classifier (one pipeline for all of them), then
    one batch of error rows for the objects whose stack has none."""
    rows = [i for i, s in enumerate(stacks) if s in sm.classifiers]
    if rows:
        ds = _pipeline(cfg, [todo[i] for i in rows], rows, [str(stacks[i]) for i in rows], sm)
        yield from ds.iter_batches(batch_size=None, batch_format="numpy")
    missing = [i for i, s in enumerate(stacks) if s not in sm.classifiers]
    if missing:
        n = len(missing)
        yield {
            "row": np.array(missing, np.int64),
            "ok": np.zeros(n, bool),
            "error": np.array([sm.missing(todo[i].key, stacks[i]) for i in missing]),
            "probs": np.zeros((n, 0), np.float32),
            "boxes": np.array(["[]"] * n),
            "confluence": np.full(n, np.nan, np.float32),
            "transient": np.zeros(n, bool),
            "morph": np.array(["{}"] * n),
            "cells": np.array(["[]"] * n),
        }


@dataclass
class _Committer:
    """Turns results into report parts, one chunk at a time, each published with its manifest."""

    cfg: ScoreConfig
    todo: list[ArchiveObject]
    stacks: list[str | None]
    models: StackModels
    summary: ScoreSummary
    fields: KeyFields | None = None
    first_chunk: int = 0  # parts already committed by this run's earlier windows

    @property
    def n_chunks(self) -> int:
        return -(-len(self.todo) // self.cfg.chunk_size)

    def commit(self, c: int, results: dict[int, tuple]) -> None:
        cfg, size = self.cfg, self.cfg.chunk_size
        lo, hi = c * size, min((c + 1) * size, len(self.todo))
        local = {i - lo: results.pop(i) for i in range(lo, hi) if i in results}
        table, cells = _rows_for_chunk(
            self.todo[lo:hi], local, self.stacks[lo:hi], self.models, self.summary.run_id, self.fields
        )
        name = f"{self.summary.run_id}-{self.first_chunk + c:05d}"
        meta = {
            "run_id": self.summary.run_id,
            "archive": cfg.archive,
            "classifier_versions": {s: m[1]["version"] for s, m in self.models.classifiers.items()},
            "detector_version": self.models.detector["version"] if self.models.detector else "",
            "segmenter_version": self.models.segmenter["version"] if self.models.segmenter else "",
            "config": asdict(cfg),
        }
        self.summary.parts.append(_publish(table, cfg.out, cfg.endpoint_url, name, meta, cells))
        self.summary.cells += 0 if cells is None else cells.num_rows
        n_err = table.num_rows - sum(1 for v in table.column("status").to_pylist() if v == "ok")
        self.summary.scored += table.num_rows
        self.summary.errors += n_err
        self.summary.no_vessel += table.column("vessel").null_count
        log.info("committed %s: %d rows (%d errors), %d/%d objects", name, table.num_rows, n_err, hi, len(self.todo))

    def consume(self, scored) -> None:
        """Commit each chunk as soon as all its rows are back; the driver holds one chunk's results
        (probabilities, boxes, error texts). Rows that never come back become error rows."""
        n_chunks = self.n_chunks
        results: dict[int, tuple] = {}
        next_chunk, received = 0, 0
        for b in scored:
            cols = ("row", "ok", "error", "probs", "boxes", "confluence", "transient", "morph", "cells")
            for r, ok, e, p, bx, cf, tr, mo, ce in zip(*(b[c] for c in cols), strict=True):
                results[int(r)] = (bool(ok), str(e), p, str(bx), float(cf), bool(tr), str(mo), str(ce))
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
    sm = _check_models(cfg)
    fields = KeyFields(cfg.key_pattern, cfg.metadata, cfg.endpoint_url)
    lease = ReportLease(cfg.out, run_id, cfg.endpoint_url).acquire()  # one writer per report
    try:
        done = DoneKeys.load(cfg.out, cfg.endpoint_url)
        chunks = 0  # parts are numbered across windows
        for todo, stacks in _plan_windows(cfg, sm, summary, done):
            if not chunks:
                if connect is not None:
                    connect()
                # read tasks and model actors may run on any node: what they read must be there (the
                # report itself is written by this driver alone)
                shared = {"ARCHIVE": cfg.archive, "--detector": cfg.detector or "", "--segmenter": cfg.segmenter or ""}
                shared.update({f"--classifier {st}": uri for st, (uri, _) in sm.classifiers.items()})
                storage.ensure_shared(shared)
            log.info(
                "%s: %d objects listed so far, %d already in the report, %d to score now (run %s)",
                cfg.archive,
                summary.listed,
                summary.skipped,
                len(todo),
                summary.run_id,
            )
            committer = _Committer(cfg, todo, stacks, sm, summary, fields, first_chunk=chunks)
            committer.consume(_scored(cfg, todo, stacks, sm))
            chunks += committer.n_chunks
        if not chunks:
            log.info(
                "%s: %d objects, all %d images already in the report", cfg.archive, summary.listed, summary.skipped
            )
        if cfg.potency:
            summary.potency_days = update_potency(cfg, sm, run_id)
    finally:
        lease.release()
    summary.seconds = time.perf_counter() - t0
    if summary.no_vessel:
        log.warning(
            "%d of %d rows got no vessel from their key: give --metadata or --key-pattern for per-vessel plots",
            summary.no_vessel,
            summary.scored,
        )
    return summary
