"""Corpus indexing: layout discovery, Pascal VOC parsing, metadata, fold assignment → manifest Parquet.

Layout (DESIGN.md)::

    <corpus>/<stack>/<class>/<image>
    <corpus>/<stack>/annotations/<image stem>.xml
    <corpus>/metadata.csv                      optional: image, vessel, day, position

Every top-level folder except ``masks`` is a stack; class names come from folder names. The manifest
has one row per image (columns in :data:`MANIFEST_SCHEMA`), and its schema metadata records the corpus
URI, the class list of each stack, the number of folds and the seed.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from xml.etree import ElementTree as ET

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from . import images, storage

log = logging.getLogger(__name__)

RESERVED_TOP = {"masks"}
ANNOTATIONS = "annotations"

BOX_TYPE = pa.struct(
    [
        ("x1", pa.float32()),
        ("y1", pa.float32()),
        ("x2", pa.float32()),
        ("y2", pa.float32()),
        ("label", pa.string()),
    ]
)
MANIFEST_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),  # full URI of the image: local absolute path or s3://bucket/key
        ("path", pa.string()),  # relative to the corpus root
        ("stack", pa.string()),
        ("label", pa.int32()),  # index into the stack's class list
        ("label_name", pa.string()),
        ("group", pa.string()),  # vessel when metadata.csv gives one, else the image itself
        ("vessel", pa.string()),
        ("day", pa.int32()),
        ("position", pa.string()),
        ("fold", pa.int32()),  # validation fold of this image, 0..folds-1
        ("size", pa.int64()),  # bytes
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("image_error", pa.string()),  # header unreadable: the reason; null when fine
        ("boxes", pa.list_(BOX_TYPE)),  # [x1, y1, x2, y2] pixel edges + label name
        ("annotation", pa.string()),  # ok | missing | malformed | null (stack has no annotations)
        ("annotation_error", pa.string()),
        ("confluence", pa.float32()),  # measured covered fraction in [0, 1] from metadata.csv; null if absent
    ]
)


@dataclass
class IndexSummary:
    corpus: str
    n_images: int = 0
    skipped: Counter = field(default_factory=Counter)  # non-image files in class folders, by extension
    ignored: int = 0  # files outside the layout (masks/, truth tables, ...)
    unreadable: list[str] = field(default_factory=list)
    annotation_problems: list[str] = field(default_factory=list)
    grouped_by: dict[str, str] = field(default_factory=dict)  # stack → "vessel" | "image"
    fold_counts: dict[str, dict[int, dict[str, int]]] = field(default_factory=dict)

    def lines(self) -> list[str]:
        out = [f"indexed {self.n_images} images under {self.corpus}"]
        if self.skipped:
            kinds = ", ".join(f"{ext or '(none)'}: {n}" for ext, n in sorted(self.skipped.items()))
            out.append(f"skipped {sum(self.skipped.values())} files that are not images ({kinds})")
        if self.ignored:
            out.append(f"ignored {self.ignored} files outside the <stack>/<class>/<image> layout")
        for msg in self.unreadable:
            out.append(f"unreadable image (kept, will be an error record): {msg}")
        for msg in self.annotation_problems:
            out.append(f"annotation problem (image kept without boxes): {msg}")
        for stack, folds in self.fold_counts.items():
            labels = sorted({lab for c in folds.values() for lab in c}, key=natural_key)
            out.append(f"{stack}: folds grouped by {self.grouped_by.get(stack, 'image')}")
            out.append("  fold " + " ".join(f"{lab:>6}" for lab in labels) + "  total")
            for f, c in sorted(folds.items()):
                out.append(f"  {f:>4} " + " ".join(f"{c.get(lab, 0):>6}" for lab in labels) + f"  {sum(c.values()):>5}")
        return out


def natural_key(name: str):
    """Sort "2" before "10", and "class2" before "class10"."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def parse_voc(data: bytes, name: str) -> list[dict]:
    """Pascal VOC XML → boxes ``{x1, y1, x2, y2, label}`` in pixel edges (VOC's 1-based inclusive
    ``xmin`` becomes ``x1 = xmin - 1``; ``xmax`` stays). Any number of objects, any label name.
    Raises ``ValueError`` naming ``name`` when the XML is malformed."""
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise ValueError(f"{name}: not well-formed XML ({exc})") from None
    if root.tag != "annotation":
        raise ValueError(f"{name}: root element is <{root.tag}>, expected <annotation>")
    boxes = []
    for i, obj in enumerate(root.iter("object")):
        label = (obj.findtext("name") or "").strip()
        bb = obj.find("bndbox")
        if not label or bb is None:
            raise ValueError(f"{name}: object {i} lacks <name> or <bndbox>")
        try:
            xmin, ymin, xmax, ymax = (float(bb.findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax"))
        except (TypeError, ValueError):
            raise ValueError(f"{name}: object {i} has a missing or non-numeric coordinate") from None
        x1, y1, x2, y2 = xmin - 1, ymin - 1, xmax, ymax
        if not (x2 > x1 and y2 > y1) or not np.isfinite([x1, y1, x2, y2]).all():
            raise ValueError(f"{name}: object {i} has an empty box {xmin, ymin, xmax, ymax}")
        boxes.append({"x1": x1, "y1": y1, "x2": x2, "y2": y2, "label": label})
    return boxes


def read_metadata(data: bytes) -> dict[str, dict]:
    """metadata.csv bytes → its rows by the ``image`` column (a path relative to the corpus)."""
    reader = csv.DictReader(io.StringIO(data.decode("utf-8-sig")))
    if not reader.fieldnames or "image" not in reader.fieldnames:
        raise ValueError("metadata.csv: needs an 'image' column (and optionally vessel, day, position)")
    out = {}
    for row in reader:
        img = (row.get("image") or "").strip()
        if img:
            out[img] = row
    return out


def _confluence(value: str | None, image: str) -> float | None:
    """A ``confluence`` cell of metadata.csv → fraction in [0, 1]: a fraction, a percentage (> 1),
    or a value with a ``%`` sign; empty → None. Anything else raises naming the image."""
    text = (value or "").strip()
    if not text:
        return None
    try:
        v = float(text.rstrip("%").strip())
    except ValueError:
        raise ValueError(f"metadata.csv: confluence {text!r} of {image} is not a number") from None
    if text.endswith("%") or v > 1.0:
        v /= 100.0
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"metadata.csv: confluence {text!r} of {image} is outside 0–100 %")
    return v


def _assign_folds(labels: np.ndarray, groups: np.ndarray | None, folds: int, seed: int, stack: str) -> np.ndarray:
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    n = len(labels)
    if folds < 2:
        raise ValueError(f"--folds must be at least 2, got {folds}")
    if groups is not None:
        n_groups = len(set(groups.tolist()))
        if n_groups < folds:
            raise ValueError(f"--folds {folds}: {stack} has only {n_groups} vessel(s); use at most {n_groups} folds")
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    else:
        if n < folds:
            raise ValueError(f"--folds {folds}: {stack} has only {n} images")
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    fold = np.full(n, -1, np.int32)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*least populated class.*")
        for f, (_, val) in enumerate(splitter.split(np.zeros(n), labels, groups)):
            fold[val] = f
    return fold


def _list(loc: storage.Location) -> list[pafs.FileInfo]:
    try:
        info = loc.fs.get_file_info(loc.path)
        if info.type == pafs.FileType.NotFound and loc.scheme == "file":
            raise ValueError(f"{loc.uri()}: no such folder")
        return [
            f
            for f in loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True, allow_not_found=True))
            if f.type == pafs.FileType.File
        ]
    except ValueError:
        raise
    except OSError as exc:
        raise storage.StorageError(f"cannot list {loc.uri()}: {storage.describe_error(exc)}") from None


@dataclass
class _Layout:
    """What a listing of the corpus holds: image entries (rel, stack, class, info), VOC files by
    (stack, stem), stacks that have an annotations folder, and the metadata file."""

    entries: list[tuple[str, str, str, pafs.FileInfo]] = field(default_factory=list)
    xmls: dict[tuple[str, str], pafs.FileInfo] = field(default_factory=dict)
    annotated_stacks: set[str] = field(default_factory=set)
    meta_info: pafs.FileInfo | None = None


def _discover(loc: storage.Location, root: str, summary: IndexSummary) -> _Layout:
    """Sort the corpus listing into the layout; count what does not belong to it."""
    layout = _Layout()
    for f in _list(loc):
        rel = f.path[len(root) + 1 :] if f.path.startswith(root + "/") else f.base_name
        parts = rel.split("/")
        if rel == "metadata.csv":
            layout.meta_info = f
        elif len(parts) == 3 and parts[0] not in RESERVED_TOP and parts[1] == ANNOTATIONS:
            layout.annotated_stacks.add(parts[0])
            if parts[2].lower().endswith(".xml"):
                layout.xmls[(parts[0], PurePosixPath(parts[2]).stem)] = f
        elif len(parts) == 3 and parts[0] not in RESERVED_TOP:
            if images.is_image_name(parts[2]):
                layout.entries.append((rel, parts[0], parts[1], f))
            else:
                summary.skipped[PurePosixPath(parts[2]).suffix.lower()] += 1
        else:
            summary.ignored += 1
    if not layout.entries:
        raise ValueError(f"{summary.corpus}: no images found in the layout <stack>/<class>/<image>")
    layout.entries.sort(key=lambda e: e[0])
    return layout


@dataclass
class _Reader:
    """Reads what indexing needs of one image: its header (size) and its VOC annotation."""

    loc: storage.Location
    layout: _Layout
    max_pixels: int

    def fetch(self, info: pafs.FileInfo) -> bytes:
        with self.loc.fs.open_input_stream(info.path) as fh:
            return fh.read()

    def probe(self, entry) -> tuple[int | None, int | None, str | None]:
        rel = entry[0]
        try:
            w, h = images.image_size(self.fetch(entry[3]), rel, self.max_pixels)
            return w, h, None
        except images.ImageError as exc:
            return None, None, str(exc)
        except OSError as exc:
            return None, None, f"{rel}: cannot read ({storage.describe_error(exc)})"

    def annotation(self, entry) -> tuple[list[dict], str | None, str | None]:
        rel, stack = entry[0], entry[1]
        if stack not in self.layout.annotated_stacks:
            return [], None, None
        stem = PurePosixPath(rel).stem
        name = f"{stack}/{ANNOTATIONS}/{stem}.xml"
        info = self.layout.xmls.get((stack, stem))
        if info is None:
            return [], "missing", f"{name}: missing"
        try:
            return parse_voc(self.fetch(info), name), "ok", None
        except ValueError as exc:
            return [], "malformed", str(exc)
        except OSError as exc:
            return [], "malformed", f"{name}: cannot read ({storage.describe_error(exc)})"

    def metadata(self) -> dict[str, dict]:
        """metadata.csv rows by relative path, and by bare file name where that is unambiguous."""
        if self.layout.meta_info is None:
            return {}
        meta = read_metadata(self.fetch(self.layout.meta_info))
        by_name = Counter(PurePosixPath(k).name for k in meta)
        for k in list(meta):
            name = PurePosixPath(k).name
            if by_name[name] == 1:
                meta.setdefault(name, meta[k])
        return meta


def _row(loc, entry, probe, annot, meta: dict, classes: dict[str, list[str]]) -> dict:
    """One manifest row (fold still -1)."""
    (rel, stack, cls, info), (w, h, err), (boxes, ann, ann_err) = entry, probe, annot
    m = meta.get(rel) or meta.get(PurePosixPath(rel).name) or {}
    vessel = (m.get("vessel") or "").strip() or None
    day = (m.get("day") or "").strip()
    return {
        "uri": loc.uri(info.path),
        "path": rel,
        "stack": stack,
        "label": classes[stack].index(cls),
        "label_name": cls,
        "group": vessel or rel,
        "vessel": vessel,
        "day": int(day) if day.lstrip("-").isdigit() else None,
        "position": (m.get("position") or "").strip() or None,
        "fold": -1,
        "size": info.size,
        "width": w,
        "height": h,
        "image_error": err,
        "boxes": boxes,
        "annotation": ann,
        "annotation_error": ann_err,
        "confluence": _confluence(m.get("confluence"), rel),
    }


def _fold_stacks(rows: list[dict], classes: dict, folds: int, seed: int, summary: IndexSummary) -> None:
    """Assign every row its validation fold, per stack, grouped by vessel where vessels are known."""
    for stack in classes:
        idx = [i for i, r in enumerate(rows) if r["stack"] == stack]
        labels = np.array([rows[i]["label"] for i in idx])
        has_vessel = any(rows[i]["vessel"] for i in idx)
        groups = np.array([rows[i]["group"] for i in idx]) if has_vessel else None
        summary.grouped_by[stack] = "vessel" if has_vessel else "image"
        fold = _assign_folds(labels, groups, folds, seed, stack)
        counts: dict[int, dict[str, int]] = {}
        for i, f in zip(idx, fold, strict=True):
            rows[i]["fold"] = int(f)
            c = counts.setdefault(int(f), {})
            c[rows[i]["label_name"]] = c.get(rows[i]["label_name"], 0) + 1
        summary.fold_counts[stack] = counts


def index_corpus(
    corpus: str,
    *,
    folds: int = 5,
    seed: int = 0,
    endpoint_url: str | None = None,
    max_pixels: int = images.DEFAULT_MAX_PIXELS,
    threads: int = 16,
) -> tuple[pa.Table, IndexSummary]:
    """Index ``corpus`` (local path or ``s3://`` URI) into a manifest table and a summary."""
    loc = storage.resolve(corpus, endpoint_url)
    root = loc.path.rstrip("/")
    summary = IndexSummary(corpus=loc.uri(root))
    layout = _discover(loc, root, summary)
    reader = _Reader(loc, layout, max_pixels)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        probes = list(pool.map(reader.probe, layout.entries))
        annots = list(pool.map(reader.annotation, layout.entries))
    meta = reader.metadata()
    stacks = sorted({e[1] for e in layout.entries})
    classes = {s: sorted({e[2] for e in layout.entries if e[1] == s}, key=natural_key) for s in stacks}
    rows = [_row(loc, *parts, meta, classes) for parts in zip(layout.entries, probes, annots, strict=True)]
    summary.unreadable += [r["image_error"] for r in rows if r["image_error"]]
    summary.annotation_problems += [r["annotation_error"] for r in rows if r["annotation_error"]]
    for problem in summary.annotation_problems:
        log.warning("annotation: %s", problem)
    _fold_stacks(rows, classes, folds, seed, summary)
    summary.n_images = len(rows)
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    meta_json = {"corpus": summary.corpus, "classes": classes, "folds": folds, "seed": seed}
    table = table.replace_schema_metadata({b"msc_ray": json.dumps(meta_json).encode()})
    return table, summary


def manifest_info(table: pa.Table) -> dict:
    """The manifest's own metadata: corpus, classes per stack, folds, seed."""
    raw = (table.schema.metadata or {}).get(b"msc_ray")
    if raw is None:
        raise ValueError("not an msc-ray manifest (no msc_ray schema metadata)")
    return json.loads(raw)


def check_run(manifest: pa.Table, manifest_uri: str, out: str, endpoint_url: str | None = None) -> int:
    """What a training run checks before any work: the manifest has at least 3 folds (nested
    evaluation: outer, inner, training), ``out`` is writable, and ``out``, the manifest and the
    corpus are seen by every node. Returns the number of folds."""
    folds = int(manifest_info(manifest)["folds"])
    if folds < 3:
        raise ValueError(f"{manifest_uri}: {folds} folds; nested evaluation needs at least 3 (outer, inner, training)")
    storage.check_writable(out, endpoint_url)
    first = manifest.column("uri")[0].as_py() if manifest.num_rows else ""
    storage.ensure_shared({"--out": out, "the manifest": manifest_uri, "the corpus (first image)": first})
    return folds


def default_manifest_uri(corpus: str) -> str:
    return corpus.rstrip("/") + "/manifest.parquet"


def write_manifest(table: pa.Table, uri: str, endpoint_url: str | None = None) -> str:
    loc = storage.resolve(uri, endpoint_url)
    try:
        if loc.scheme == "file":
            parent = str(PurePosixPath(loc.path).parent)
            loc.fs.create_dir(parent, recursive=True)
            tmp = loc.path + ".tmp"
            pq.write_table(table, tmp, filesystem=loc.fs)
            loc.fs.move(tmp, loc.path)  # readers never see a half-written manifest
        else:
            pq.write_table(table, loc.path, filesystem=loc.fs)
    except OSError as exc:
        raise storage.StorageError(f"cannot write {loc.uri()}: {storage.describe_error(exc)}") from None
    return loc.uri()


def read_manifest(uri: str, endpoint_url: str | None = None) -> pa.Table:
    loc = storage.resolve(uri, endpoint_url)
    try:
        table = pq.read_table(loc.path, filesystem=loc.fs)
    except FileNotFoundError:
        raise ValueError(f"{uri}: no such manifest") from None
    except OSError as exc:
        raise storage.StorageError(f"cannot read {uri}: {storage.describe_error(exc)}") from None
    manifest_info(table)
    return table


def load_or_index(
    corpus_or_manifest: str, *, folds: int = 5, seed: int = 0, endpoint_url: str | None = None
) -> pa.Table:
    """A manifest URI (``*.parquet``) is read; a corpus is indexed on the fly."""
    if corpus_or_manifest.endswith(".parquet"):
        return read_manifest(corpus_or_manifest, endpoint_url)
    table, summary = index_corpus(corpus_or_manifest, folds=folds, seed=seed, endpoint_url=endpoint_url)
    for line in summary.lines():
        log.info("%s", line)
    return table
