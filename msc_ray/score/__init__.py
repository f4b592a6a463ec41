"""Batch scoring of archived production images into a Parquet report, exactly once.

Modules, along the job's seams: :mod:`.config` (the job, the report's schemas, key fields and metadata),
:mod:`.listing` (the archive), :mod:`.commit` (one writer, atomic parts, what is already scored),
:mod:`.actor` (the Ray Data stages and the model actor), :mod:`.run` (the job itself).

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

from .actor import ModelActor, _preprocess, stack_of
from .commit import (
    LEASE_RENEW,
    LEASE_SECONDS,
    DoneKeys,
    ReportLease,
    _publish,
    committed,
    read_cells,
    read_potency,
    read_report,
    update_potency,
)
from .config import (
    BOX_TYPE,
    CELL_SCHEMA,
    KEY_PATTERN,
    MORPH_FIELDS,
    MORPH_SCHEMA,
    POTENCY_SCHEMA,
    PREPROCESS_CHOICES,
    REPORT_SCHEMA,
    RUN_ID,
    STACK_CHOICES,
    ArchiveObject,
    KeyFields,
    ScoreConfig,
    ScoreSummary,
    classifier_entries,
)
from .listing import _s3_reason, _split_s3, check_writable, iter_archive, list_archive
from .run import StackModels, _check_models, _Committer, _pipeline, _plan_windows, score_archive, stack_models

__all__ = [
    "BOX_TYPE",
    "CELL_SCHEMA",
    "KEY_PATTERN",
    "LEASE_RENEW",
    "LEASE_SECONDS",
    "MORPH_FIELDS",
    "MORPH_SCHEMA",
    "POTENCY_SCHEMA",
    "PREPROCESS_CHOICES",
    "REPORT_SCHEMA",
    "RUN_ID",
    "STACK_CHOICES",
    "ArchiveObject",
    "DoneKeys",
    "KeyFields",
    "ModelActor",
    "ReportLease",
    "ScoreConfig",
    "ScoreSummary",
    "StackModels",
    "_Committer",
    "_check_models",
    "_pipeline",
    "_plan_windows",
    "_preprocess",
    "_publish",
    "_s3_reason",
    "_split_s3",
    "check_writable",
    "classifier_entries",
    "committed",
    "iter_archive",
    "list_archive",
    "read_cells",
    "read_potency",
    "read_report",
    "score_archive",
    "stack_models",
    "stack_of",
    "update_potency",
]
