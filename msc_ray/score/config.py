"""The scoring job's configuration, the report's schemas and what an archive object carries:
its key fields (vessel, day, position) and the metadata sheet joined to them."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import pyarrow as pa
import pyarrow.parquet as pq

from .. import VIEWS, images, morphology, storage

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

    def actor_plan(self, cluster: dict[str, float], nodes: int = 1) -> tuple[int, int]:
        """(model actors, images per model call) for a cluster's resources (``ray.cluster_resources()``);
        a setting above 0 is kept. Actors: on GPUs as many as the cluster's GPUs hold at
        ``gpus_per_actor`` each (their decode tasks take every CPU); on CPUs one per core, less a
        quarter of the cores kept for decoding — a model call costs far more CPU than decoding its
        images (bench_score: about 13 ms against 1.5 ms an image for a ResNet-18 at 128 px from 256-px
        PNGs). On one node (``nodes``: nodes with CPUs) under four cores that quarter is no core: every
        core runs an actor and the decoding shares them (:meth:`cpu_shares`); on two cores two actors
        scored the quickstart's archive (classifier, detector, segmenter) in 71 s against 108 s for one
        beside a core held for decoding. On several nodes at least one core is kept: shares there could
        leave every node a piece too small for a decode task. Batch: 256 on a GPU (the bare bfloat16
        forward's measured best), 32 on a CPU."""
        cpus, gpus = int(cluster.get("CPU", 1)), float(cluster.get("GPU", 0))
        if self.gpus_per_actor > 0:
            actors = max(1, int(gpus // self.gpus_per_actor))
        else:
            actors = max(1, cpus - (cpus // 4 if nodes <= 1 else max(1, cpus // 4)))
        batch = 256 if self.gpus_per_actor > 0 else 32
        return self.concurrency or actors, self.batch_size or batch

    def cpu_shares(self, cluster: dict[str, float], actors: int, nodes: int = 1) -> tuple[float, float]:
        """(CPUs each model actor holds, CPUs each decode task asks for) beside ``actors`` model actors.
        A CPU actor holds a core and a decode task one while the cluster keeps a core for decoding beside
        the actors; where one node does not (one core, or ``--concurrency`` as large as the cores), the
        actors and one decode task share the cores equally — otherwise the actors held every core, waiting
        for images that no task could decode, and the run never ended. Several nodes without that core
        are refused, naming the option. GPU actors hold no CPU."""
        if self.gpus_per_actor > 0:
            return 0.0, 1.0
        cpus = float(cluster.get("CPU", 1))
        if actors + 1 <= cpus:
            return 1.0, 1.0
        if nodes > 1:
            raise ValueError(
                f"--concurrency {actors}: {actors} model actors leave no core of this cluster's {int(cpus)} "
                f"to decode images; at most {max(1, int(cpus) - 1)}"
            )
        share = math.floor(cpus / (actors + 1) * 1e4) / 1e4  # Ray counts resources to 1e-4
        return share, share

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
