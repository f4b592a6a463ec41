"""The scoring job: the models per stack, the archive planned in windows, one streaming Ray Data
execution per window, each chunk committed as it completes."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

from .. import data, images, inference, storage
from .actor import ModelActor, _preprocess, stack_of
from .commit import DoneKeys, ReportLease, _publish, _run_id_used, update_potency
from .config import CELL_SCHEMA, MORPH_FIELDS, REPORT_SCHEMA, ArchiveObject, KeyFields, ScoreConfig, ScoreSummary
from .listing import check_writable, iter_archive

log = logging.getLogger(__name__)

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
        from .. import potency

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
    from .. import models

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
    cluster = ray.cluster_resources()
    nodes = sum(1 for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0)
    actors, batch = cfg.actor_plan(cluster, nodes)
    actor_cpus, decode_cpus = cfg.cpu_shares(cluster, actors, nodes)
    ds = _objects_dataset(todo, rows, stacks, cfg.decode_batch).map_batches(
        _preprocess,
        batch_size=cfg.decode_batch,
        batch_format="numpy",
        num_cpus=decode_cpus,
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
    shared = f", sharing {int(cluster.get('CPU', 1))} CPU(s) with the decoding" if 0 < actor_cpus < 1 else ""
    log.info("%s: %d model actor(s)%s, %d images per model call", "+".join(here), actors, shared, batch)
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
        num_cpus=actor_cpus,
    )


def _objects_dataset(todo: list[ArchiveObject], rows: list[int], stacks: list[str], block: int):
    """The objects to score as a Ray Data dataset in blocks of ``block`` rows, kept in order."""
    table = pa.table(
        {
            "row": pa.array(rows, pa.int64()),
            "uri": [o.uri for o in todo],
            "key": [o.key for o in todo],
            "stack": stacks,
        }
    )
    return data.ordered_blocks([table.slice(i, block) for i in range(0, table.num_rows, block)])


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
