"""The report's commit protocol: one writer per report (a lease), parts published atomically with their
manifests, the committed parts read back, the keys already scored, and the potency per vessel-day."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import time
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import storage
from .config import CELL_SCHEMA, MORPH_FIELDS, POTENCY_SCHEMA, REPORT_SCHEMA, ScoreConfig

if TYPE_CHECKING:
    from .run import StackModels

log = logging.getLogger(__name__)

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
    from .. import potency

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
