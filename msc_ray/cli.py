"""The ``msc-ray`` command line: thin commands over one library function each.

A user error (bad option, unreadable input) prints one line ``error: ...`` and exits 1."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Annotated

import typer

from . import storage
from .quickstart import QuickstartConfig
from .storage import StorageError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Quality control for MSC manufacturing on Ray: synthesise, index, train, score, report.",
    pretty_exceptions_enable=False,
)


class UserError(Exception):
    """A problem with the user's input or options: reported in one line, exit status 1."""


def _one_line_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (UserError, ValueError, FileNotFoundError, PermissionError, StorageError) as exc:
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            typer.echo(f"error: {msg}", err=True)
            raise typer.Exit(1) from None

    return wrapper


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log at DEBUG level.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@app.command()
@_one_line_errors
def synth(
    out: Annotated[Path, typer.Argument(help="Folder to write the corpus into (created if missing).")],
    n: Annotated[int, typer.Option("--n", help="Images per stack.")] = 40,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 512,
    stack: Annotated[str, typer.Option(help="sstack, mstack or both.")] = "both",
    fmt: Annotated[str, typer.Option("--format", help="png, jpg or tif (16-bit).")] = "png",
    seed: Annotated[int, typer.Option(help="Same seed, byte-identical corpus.")] = 0,
    abnormal_fraction: Annotated[float, typer.Option(help="Share of single-stack images with abnormal cells.")] = 0.3,
    workers: Annotated[int, typer.Option(help="Processes rendering in parallel.")] = 1,
    preview: Annotated[
        Path | None, typer.Option(help="Also write a contact sheet PNG (one image per stack and class).")
    ] = None,
) -> None:
    """Write a synthetic phase-contrast MSC corpus with exact ground truth."""
    from . import synth as synth_mod

    cfg = synth_mod.SynthConfig(
        n=n, size=size, stack=stack, fmt=fmt, seed=seed, abnormal_fraction=abnormal_fraction, workers=workers
    )
    cfg.validate()
    total = n * len(cfg.stacks)

    def bar(it):
        with typer.progressbar(it, length=total, label="synth", file=None) as b:
            yield from b

    rows = synth_mod.synthesize(out, cfg, progress=bar)
    counts: dict[tuple[str, str], int] = {}
    for r in rows:
        counts[(r["stack"], r["label"])] = counts.get((r["stack"], r["label"]), 0) + 1
    typer.echo(f"wrote {len(rows)} images to {out}")
    for (s, lab), c in sorted(counts.items()):
        typer.echo(f"  {s} class {lab}: {c}")
    if preview is not None:
        dest = synth_mod.preview(out, rows, preview)
        typer.echo(f"preview: {dest}")


EndpointOpt = Annotated[
    str | None,
    typer.Option(help="S3-compatible endpoint, e.g. http://127.0.0.1:8333.", envvar="AWS_ENDPOINT_URL"),
]


AddressOpt = Annotated[str | None, typer.Option(help="Ray cluster address (default RAY_ADDRESS, else local).")]
# options that train-detector and train-segmenter (both Ray Train DDP per outer fold) share
WorkersOpt = Annotated[int, typer.Option(help="DDP workers per fold.")]
GpuOpt = Annotated[bool, typer.Option(help="One GPU per worker.")]
CpusPerWorkerOpt = Annotated[float, typer.Option(help="CPUs per worker.")]
PlacementOpt = Annotated[
    str, typer.Option(help="PACK (workers share nodes) or SPREAD (one node per worker where it can).")
]
FoldsOpt = Annotated[int, typer.Option(help="Folds when indexing a corpus (a manifest keeps its own); at least 3.")]
OnlyFoldsOpt = Annotated[str, typer.Option(help="Comma-separated outer folds to run (default: all).")]
MinEpochsOpt = Annotated[
    int, typer.Option(help="Epochs before validation and early stopping start (0: half of --epochs).")
]
LrOpt = Annotated[float, typer.Option(help="AdamW learning rate (after a one-epoch warm-up; cosine decay).")]
SeedOpt = Annotated[int, typer.Option(help="Seed of folds, shards and augmentation.")]
# --precision's choices: the rule of engine.use_bf16
PRECISION_CHOICES = (
    "bf16 (bfloat16 autocast), fp32, or auto (bf16 on a GPU and on a CPU with bfloat16 in hardware, AMX or "
    "AVX-512 BF16; fp32 otherwise)"
)
PrecisionOpt = Annotated[
    str,
    typer.Option(help=f"Arithmetic of the training steps: {PRECISION_CHOICES}. Validation and outer folds: fp32."),
]


@app.command()
@_one_line_errors
def index(
    corpus: Annotated[str, typer.Argument(help="Corpus root: a local folder or s3://bucket/prefix.")],
    out: Annotated[
        str | None, typer.Option(help="Manifest to write (local or s3://); default CORPUS/manifest.parquet.")
    ] = None,
    folds: Annotated[int, typer.Option(help="Cross-validation folds.")] = 5,
    seed: Annotated[int, typer.Option(help="Seed of the fold assignment.")] = 0,
    endpoint_url: EndpointOpt = None,
) -> None:
    """Index a corpus into the manifest Parquet: layout, VOC boxes, metadata, grouped stratified folds."""
    from . import corpus as corpus_mod

    table, summary = corpus_mod.index_corpus(corpus, folds=folds, seed=seed, endpoint_url=endpoint_url)
    dest = corpus_mod.write_manifest(table, out or corpus_mod.default_manifest_uri(corpus), endpoint_url)
    for line in summary.lines():
        typer.echo(line)
    typer.echo(f"manifest: {dest}")


def _ensure_ray(address: str | None = None) -> None:
    """Connect to ``address`` / ``RAY_ADDRESS`` when given, else start a local Ray."""
    import os

    import ray

    if not ray.is_initialized():
        addr = address or os.environ.get("RAY_ADDRESS")
        ctx = ray.init(address=addr or None, include_dashboard=False, configure_logging=False, log_to_driver=True)
        # without an address, ray.init joins a cluster started with `ray start` on this host, if any
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        total = ray.cluster_resources()
        logging.getLogger("msc_ray").info(
            "Ray cluster at %s: %d node(s), %d CPUs, %d GPUs",
            ctx.address_info.get("gcs_address", "?"),
            len(nodes),
            int(total.get("CPU", 0)),
            int(total.get("GPU", 0)),
        )


def _absolute(uri: str) -> str:
    """A local path made absolute (Ray workers and trials run in folders of their own); URIs as given."""
    return storage.absolute(uri)


def _manifest_for(corpus_or_manifest: str, out: str, folds: int, seed: int, endpoint_url, *, reuse: bool) -> str:
    """A manifest given, or ``OUT/manifest.parquet`` indexed from the corpus (kept when ``reuse`` and
    it exists). ``out`` is a local path or an ``s3://`` URI."""
    from . import corpus as corpus_mod
    from . import storage

    corpus_or_manifest = _absolute(corpus_or_manifest)
    if corpus_or_manifest.endswith(".parquet"):
        return corpus_or_manifest
    manifest = storage.join(out, "manifest.parquet")
    if not (reuse and storage.exists(manifest, endpoint_url)):
        table, summary = corpus_mod.index_corpus(corpus_or_manifest, folds=folds, seed=seed, endpoint_url=endpoint_url)
        corpus_mod.write_manifest(table, manifest, endpoint_url)
        for line in summary.lines():
            typer.echo(line)
    return manifest


def _classifier_entry(entry: str) -> str:
    """``STACK=PATH`` or ``PATH`` with a local path made absolute."""
    from .score import classifier_entries

    ((stack, uri),) = classifier_entries(entry)
    return f"{stack}={_absolute(uri)}" if stack else _absolute(uri)


def _range(text: str, option: str) -> tuple[float, float]:
    try:
        parts = [float(p) for p in text.split(":")]
    except ValueError:
        raise ValueError(f"{option} {text!r}: give a number or LO:HI") from None
    lo, hi = (parts[0], parts[0]) if len(parts) == 1 else (parts[0], parts[1]) if len(parts) == 2 else (0, -1)
    if not 0 < lo <= hi:
        raise ValueError(f"{option} {text!r}: give a positive number or LO:HI with 0 < LO <= HI")
    return lo, hi


@app.command()
@_one_line_errors
def tune(
    corpus_or_manifest: Annotated[str, typer.Argument(help="Corpus root, or a manifest .parquet (local or s3://).")],
    out: Annotated[
        str,
        typer.Option(
            help="Run folder: experiments, table, plots, artifact. A local path, or s3://bucket/prefix "
            "(on a multi-node cluster: shared storage every node reaches)."
        ),
    ],
    stack: Annotated[str, typer.Option(help="sstack or mstack (a stack folder of the corpus).")] = "sstack",
    backbones: Annotated[str, typer.Option(help="Comma-separated registry names.")] = "compact_cnn,resnet18",
    folds: FoldsOpt = 5,
    max_epochs: Annotated[
        int, typer.Option(help="Epochs per trial at most (0: by stack — 25 single-stack, 60 multi-stack).")
    ] = 0,
    patience: Annotated[
        int, typer.Option(help="Epochs without a better inner-validation ROC-AUC before a trial stops.")
    ] = 6,
    min_epochs: Annotated[
        int,
        typer.Option(help="Epochs before a best epoch is kept and a trial can stop early (0: half of --max-epochs)."),
    ] = 0,
    samples: Annotated[int, typer.Option(help="Learning-rate/weight-decay samples per (backbone, fold).")] = 1,
    lr: Annotated[
        str, typer.Option(help="Learning rate, or a range LO:HI sampled log-uniformly per trial.")
    ] = "1e-3:3e-3",
    warmup_epochs: Annotated[int, typer.Option(help="Epochs of linear learning-rate warm-up before cosine decay.")] = 2,
    size: Annotated[
        int,
        typer.Option(
            help="Input side in pixels, raised to what a backbone needs (0: by stack — 64 single-stack, 128 "
            "multi-stack, whose thin cells vanish at 64 px)."
        ),
    ] = 0,
    views: Annotated[
        int,
        typer.Option(
            help="Test-time views averaged for the temperature, Table 1 and the exported model: 8 (quarter turns "
            "and mirror images), 4 (quarter turns) or 1."
        ),
    ] = 8,
    coverage: Annotated[
        bool,
        typer.Option(
            help="Coverage supervision: where the corpus has cell masks (masks/<stack>/), the compact CNN also "
            "learns a map of the covered pixels during training (not part of the exported model)."
        ),
    ] = True,
    coverage_weight: Annotated[
        float, typer.Option(help="Weight of the coverage term beside the band and confluence losses.")
    ] = 3.0,
    batch_size: Annotated[int, typer.Option(help="Images per optimisation step.")] = 32,
    augment_on: Annotated[
        str,
        typer.Option(
            help="Where training batches are augmented: cpu (one image at a time), device (whole batches on the "
            "trial's device) or auto (device on a GPU, cpu otherwise)."
        ),
    ] = "auto",
    precision: Annotated[
        str,
        typer.Option(help=f"Arithmetic of the classifier's forward passes: {PRECISION_CHOICES}."),
    ] = "auto",
    channels: Annotated[
        int, typer.Option(help="3: gray repeated for ImageNet-style inputs; 1: first conv adapted.")
    ] = 3,
    pretrained: Annotated[
        str, typer.Option(help="auto (cached ImageNet weights if present), none, or a file.")
    ] = "auto",
    asha: Annotated[bool, typer.Option(help="ASHA across the trials of each fold.")] = True,
    cpus_per_trial: Annotated[float, typer.Option(help="CPUs per trial.")] = 1.0,
    gpus_per_trial: Annotated[float, typer.Option(help="GPUs per trial; a fraction shares a GPU.")] = 0.0,
    max_concurrent: Annotated[int, typer.Option(help="Trials at once; 0 = no limit (trials queue for resources).")] = 0,
    seed: Annotated[int, typer.Option(help="Seed of folds, sampling and augmentation.")] = 0,
    resume: Annotated[bool, typer.Option(help="Finish an interrupted run in --out.")] = False,
    endpoint_url: EndpointOpt = None,
    address: AddressOpt = None,
) -> None:
    """Backbone × fold search on Ray Tune → Table 1 (mean ± SD over folds), plots, a scoring artifact."""
    from . import corpus as corpus_mod
    from . import models
    from . import tune as tune_mod

    names = tuple(b.strip() for b in backbones.split(",") if b.strip())
    for b in names:
        models.backbone(b)
    lr_min, lr_max = _range(lr, "--lr")
    out = _absolute(out)
    manifest = _manifest_for(corpus_or_manifest, out, folds, seed, endpoint_url, reuse=resume)
    job = tune_mod.TuneJobConfig(
        manifest=manifest,
        out=out,
        stack=stack,
        backbones=names,
        max_epochs=max_epochs,
        patience=patience,
        min_epochs=min_epochs,
        samples=samples,
        lr_min=lr_min,
        lr_max=lr_max,
        warmup_epochs=warmup_epochs,
        batch_size=batch_size,
        augment_on=augment_on,
        precision=precision,
        size=size,
        views=views,
        coverage=coverage,
        coverage_weight=coverage_weight,
        channels=channels,
        pretrained=pretrained,
        asha=asha,
        cpus_per_trial=cpus_per_trial,
        gpus_per_trial=gpus_per_trial,
        max_concurrent=max_concurrent,
        seed=seed,
        endpoint_url=endpoint_url,
    )
    info = corpus_mod.manifest_info(corpus_mod.read_manifest(manifest, endpoint_url))
    job.validate(info["classes"])
    _ensure_ray(address)
    try:
        outcome = tune_mod.run_search(job, resume=resume)
    except KeyboardInterrupt:  # between two experiments (within one, Tune ends it: an "interrupted" error)
        raise UserError(f"interrupted; finish the search with --resume (same --out {out})") from None
    typer.echo(storage.read_bytes(outcome.outputs["table_md"], endpoint_url).decode())
    w = outcome.winner
    typer.echo(f"winner: {w['backbone']} lr={w['lr']:.2e} weight_decay={w['weight_decay']:.2e}")
    for what, path in outcome.outputs.items():
        typer.echo(f"  {what:10s} {path}")


@app.command("train-detector")
@_one_line_errors
def train_detector(
    corpus_or_manifest: Annotated[str, typer.Argument(help="Corpus root, or a manifest .parquet (local or s3://).")],
    out: Annotated[
        str,
        typer.Option(
            help="Run folder: per-fold checkpoints, Table 2, panel, artifact. A local path, or "
            "s3://bucket/prefix (on a multi-node cluster: shared storage every node reaches)."
        ),
    ],
    workers: WorkersOpt = 2,
    gpu: GpuOpt = False,
    cpus_per_worker: CpusPerWorkerOpt = 1.0,
    placement: PlacementOpt = "PACK",
    max_fdr: Annotated[
        float,
        typer.Option(help="Operating point: the loosest score threshold whose inner-validation FDR stays within this."),
    ] = 0.02,
    folds: FoldsOpt = 5,
    only_folds: OnlyFoldsOpt = "",
    epochs: Annotated[int, typer.Option(help="Epochs per fold at most (early stopping on inner mAP@0.5).")] = 30,
    patience: Annotated[int, typer.Option(help="Epochs without a better inner mAP@0.5 before a fold stops.")] = 6,
    min_epochs: MinEpochsOpt = 0,
    backbone: Annotated[
        str, typer.Option(help="compact_fpn (default, CPUs), resnet18_fpn or resnet50_fpn (GPUs).")
    ] = "compact_fpn",
    size: Annotated[int, typer.Option(help="Image side the detector sees.")] = 128,
    batch_size: Annotated[int, typer.Option(help="Images per worker per step.")] = 4,
    lr: LrOpt = 1e-3,
    seed: SeedOpt = 0,
    precision: PrecisionOpt = "auto",
    endpoint_url: EndpointOpt = None,
    address: AddressOpt = None,
) -> None:
    """RetinaNet for abnormal cells with Ray Train (DDP) per fold → Table 2, a panel, a detector artifact.
    Rerunning with the same --out resumes every fold from its latest checkpoint."""
    from . import detect

    job = _per_fold_job(detect.DetectJobConfig, corpus_or_manifest, out, folds, only_folds, locals(), max_fdr=max_fdr)
    _run_per_fold(job, detect.train_detector, address)


@app.command("train-segmenter")
@_one_line_errors
def train_segmenter(
    corpus_or_manifest: Annotated[
        str,
        typer.Argument(
            help="Corpus root with instance masks (masks/<stack>/<stem>.png and masks/<stack>/nuclei/<stem>.png), "
            "or its manifest .parquet (local or s3://)."
        ),
    ],
    out: Annotated[
        str,
        typer.Option(
            help="Run folder: per-fold checkpoints, the table, a panel, the artifact. A local path, or "
            "s3://bucket/prefix (on a multi-node cluster: shared storage every node reaches)."
        ),
    ],
    stack: Annotated[str, typer.Option(help="Stack whose images and masks train the model.")] = "sstack",
    workers: WorkersOpt = 2,
    gpu: GpuOpt = False,
    cpus_per_worker: CpusPerWorkerOpt = 1.0,
    placement: PlacementOpt = "PACK",
    folds: FoldsOpt = 5,
    only_folds: OnlyFoldsOpt = "",
    epochs: Annotated[
        int, typer.Option(help="Epochs per fold at most (early stopping on the inner fold's cell/nucleus box AP@0.5).")
    ] = 60,
    patience: Annotated[
        int, typer.Option(help="Epochs without a better inner cell/nucleus box AP@0.5 before a fold stops.")
    ] = 6,
    min_epochs: MinEpochsOpt = 0,
    backbone: Annotated[
        str,
        typer.Option(
            help="unet (U-Net + seeded watershed; default), unet_wide (twice the channels, GPUs) or Mask "
            "R-CNN: compact_fpn (CPUs), resnet50_fpn (GPUs); Mask R-CNN trains best with --batch-size 2 --lr 1e-3."
        ),
    ] = "unet",
    size: Annotated[
        int, typer.Option(help="Image side the segmenter sees (keep the corpus's own: nuclei are small).")
    ] = 128,
    batch_size: Annotated[int, typer.Option(help="Images per worker per step.")] = 8,
    lr: LrOpt = 3e-3,
    views: Annotated[
        int,
        typer.Option(
            help="U-Net: test-time views its maps are averaged over (1, 4 quarter turns, 8 with their mirror "
            "images) for the outer folds, the inner-fold thresholds and the artifact; early stopping uses one."
        ),
    ] = 8,
    seed: SeedOpt = 0,
    precision: PrecisionOpt = "auto",
    endpoint_url: EndpointOpt = None,
    address: AddressOpt = None,
) -> None:
    """Cell and nucleus instance segmentation with Ray Train (DDP) per fold → mask AP, counting and
    confluence errors on outer folds, a panel, a segmenter artifact. Rerunning with the same --out resumes."""
    from . import segment

    job = _per_fold_job(
        segment.SegmentJobConfig, corpus_or_manifest, out, folds, only_folds, locals(), stack=stack, views=views
    )
    _run_per_fold(job, segment.train_segmenter, address)


def _per_fold_job(cls, corpus_or_manifest: str, out: str, folds: int, only_folds: str, options: dict, **extra):
    """train-detector's or train-segmenter's job (``cls``) from their options: absolute paths, the outer
    folds to run, the manifest (indexed into ``OUT/manifest.parquet`` from a corpus; a rerun keeps the
    folds it started with). The options are checked before anything is indexed: a wrong one is its own
    one-line error, not one that waits for a corpus to be read."""
    from dataclasses import replace

    out = _absolute(out)
    shared = ("epochs", "patience", "min_epochs", "workers", "gpu", "cpus_per_worker", "backbone", "size")
    job = cls(
        manifest=corpus_or_manifest,
        out=out,
        folds=tuple(int(f) for f in only_folds.split(",") if f.strip()),
        placement=options["placement"].upper(),
        **{k: options[k] for k in (*shared, "batch_size", "lr", "seed", "precision", "endpoint_url")},
        **extra,
    )
    job.validate()
    manifest = _manifest_for(corpus_or_manifest, out, folds, options["seed"], options["endpoint_url"], reuse=True)
    return replace(job, manifest=manifest)


def _run_per_fold(job, train, address: str | None) -> None:
    """Join or start Ray (the job was checked by :func:`_per_fold_job`), train every fold; print the table
    and where the outputs are."""
    _ensure_ray(address)
    try:
        res = train(job)
    except KeyboardInterrupt:  # between two folds (within one, Ray Train aborts it)
        raise UserError(f"interrupted; rerun the same command (same --out {job.out}) to resume") from None
    typer.echo(storage.read_bytes(res["table_md"], job.endpoint_url).decode())
    for what in ("table_csv", "table_md", "panel", "artifact"):
        typer.echo(f"  {what:10s} {res[what]}")


@app.command()
@_one_line_errors
def score(
    archive: Annotated[str, typer.Argument(help="Images to score: a local folder or s3://bucket/prefix.")],
    classifier: Annotated[
        list[str],
        typer.Option(
            help="Classifier artifact (folder or s3:// prefix) per stack: STACK=ARTIFACT (repeat the option "
            "for sstack and mstack), or ARTIFACT alone for the stack it was trained on."
        ),
    ],
    out: Annotated[str, typer.Option(help="Report location: a local folder or s3://bucket/prefix.")],
    detector: Annotated[str | None, typer.Option(help="Detector artifact for abnormal-cell boxes.")] = None,
    segmenter: Annotated[
        str | None,
        typer.Option(
            help="Segmenter artifact: cell count, mask confluence and morphology per row, and a per-cell table."
        ),
    ] = None,
    potency: Annotated[
        str | None,
        typer.Option(help="Potency artifact (`msc-ray train-potency`): predicted potency per vessel-day."),
    ] = None,
    stack: Annotated[
        str, typer.Option(help="auto (from a sstack/mstack folder in the key), sstack or mstack.")
    ] = "auto",
    detect_all_stacks: Annotated[
        bool, typer.Option(help="Run the detector and segmenter on multi-stack images too.")
    ] = False,
    batch_size: Annotated[int, typer.Option(help="Images per model call (0: 256 on a GPU, 32 on a CPU).")] = 0,
    concurrency: Annotated[
        int,
        typer.Option(
            help="Model actors, each loading the models once (0: from the cluster: one per GPU share, or "
            "one per CPU less a quarter of the CPUs for decoding)."
        ),
    ] = 0,
    gpus_per_actor: Annotated[float, typer.Option(help="GPUs per model actor (0: CPU).")] = 0.0,
    views: Annotated[
        int,
        typer.Option(
            help="Test-time views per classifier call: 0 keeps each artifact's own (8 for models trained with "
            "the default); 1 is eight times cheaper on a CPU. Another count is recorded in classifier_version."
        ),
    ] = 0,
    preprocess_on: Annotated[
        str,
        typer.Option(
            help="Where decoded images are equalised and resized to the models' inputs: tasks (the CPU decode "
            "tasks), actor (the model actor, on its GPU) or auto (actor when it has a GPU)."
        ),
    ] = "auto",
    chunk_size: Annotated[int, typer.Option(help="Objects per committed report part.")] = 2000,
    window: Annotated[
        int, typer.Option(help="Objects listed, planned and scored at a time (bounds the driver's memory).")
    ] = 50_000,
    run_id: Annotated[
        str,
        typer.Option(help="Run id recorded in every row and naming its parts: a new name (default: time + random)."),
    ] = "",
    key_pattern: Annotated[
        str | None,
        typer.Option(
            help="Regex with named groups vessel (and day, position) searched in each key, e.g. "
            "'vessel-(?P<vessel>\\d+)/day-(?P<day>\\d+)/(?P<position>\\w+)'."
        ),
    ] = None,
    metadata: Annotated[
        str | None,
        typer.Option(help="CSV or Parquet table with a key column (relative to ARCHIVE) and vessel, day, position."),
    ] = None,
    endpoint_url: EndpointOpt = None,
    address: AddressOpt = None,
) -> None:
    """Score an archive into a Parquet report, exactly once per object and model version."""
    from . import score as score_mod

    cfg = score_mod.ScoreConfig(
        archive=_absolute(archive),
        classifier=tuple(_classifier_entry(c) for c in classifier),
        out=_absolute(out),
        detector=_absolute(detector) if detector else None,
        segmenter=_absolute(segmenter) if segmenter else None,
        potency=_absolute(potency) if potency else None,
        stack=stack,
        detect_all_stacks=detect_all_stacks,
        batch_size=batch_size,
        concurrency=concurrency,
        gpus_per_actor=gpus_per_actor,
        views=views,
        preprocess_on=preprocess_on,
        chunk_size=chunk_size,
        window=window,
        run_id=run_id,
        endpoint_url=endpoint_url,
        key_pattern=key_pattern,
        metadata=_absolute(metadata) if metadata else None,
    )
    cfg.validate()
    s = score_mod.score_archive(cfg, connect=lambda: _ensure_ray(address))
    typer.echo(
        f"run {s.run_id}: {s.listed} objects, {s.skipped} already in the report, {s.scored} scored "
        f"({s.errors} error rows) in {s.seconds:.1f}s" + (f"; {s.no_vessel} rows got no vessel" if s.no_vessel else "")
    )
    typer.echo(f"report: {out}")
    if segmenter:
        typer.echo(f"  per-cell table: {s.cells} cells this run (read all: msc_ray.score.read_cells)")
    if potency:
        typer.echo(f"  potency: {s.potency_days} vessel-days predicted (msc_ray.score.read_potency)")


@app.command()
@_one_line_errors
def serve(
    classifier: Annotated[
        list[str],
        typer.Option(help="Classifier artifact per stack: STACK=ARTIFACT (repeatable), or ARTIFACT for its own stack."),
    ],
    detector: Annotated[str | None, typer.Option(help="Detector artifact for abnormal-cell boxes.")] = None,
    detect_all_stacks: Annotated[bool, typer.Option(help="Run the detector on multi-stack images too.")] = False,
    host: Annotated[str, typer.Option(help="Address the HTTP proxy listens on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the page and the API.")] = 8000,
    replicas: Annotated[int, typer.Option(help="Replicas at most; the autoscaler moves between the bounds.")] = 1,
    min_replicas: Annotated[int, typer.Option(help="Replicas at least.")] = 1,
    gpus_per_replica: Annotated[float, typer.Option(help="GPUs per replica (0: CPU).")] = 0.0,
    cpus_per_replica: Annotated[float, typer.Option(help="CPUs per replica.")] = 1.0,
    max_batch_size: Annotated[int, typer.Option(help="Requests batched into one model call at most.")] = 16,
    max_request_mb: Annotated[float, typer.Option(help="Largest request accepted, in MiB.")] = 50.0,
    max_pixels: Annotated[int, typer.Option(help="Largest image accepted, in pixels.")] = 40_000_000,
    detach: Annotated[
        bool, typer.Option(help="On a cluster: deploy, wait until it answers, and return (it keeps serving).")
    ] = False,
    endpoint_url: EndpointOpt = None,
    address: AddressOpt = None,
) -> None:
    """Serve the models online (Ray Serve): a page at / and a JSON API (/predict, /models, /healthz).
    Runs until Ctrl-C (which stops the application), or deploys and returns with --detach."""
    import os
    import signal
    import time

    from . import serve as serve_mod

    cfg = serve_mod.ServeConfig(
        classifier=tuple(_classifier_entry(c) for c in classifier),
        detector=_absolute(detector) if detector else None,
        detect_all_stacks=detect_all_stacks,
        endpoint_url=endpoint_url,
        host=host,
        port=port,
        min_replicas=min_replicas,
        max_replicas=max(replicas, min_replicas),
        cpus_per_replica=cpus_per_replica,
        gpus_per_replica=gpus_per_replica,
        max_batch_size=max_batch_size,
        max_request_mb=max_request_mb,
        max_pixels=max_pixels,
    )
    serve_mod.check(cfg)
    local = not (address or os.environ.get("RAY_ADDRESS"))
    if detach and local:
        raise UserError("--detach: needs a cluster (--address or RAY_ADDRESS); a local Ray ends with this command")
    if local and not serve_mod.port_free(host, port):
        raise UserError(f"--port {port}: already in use on {host}")

    def on_term(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)  # a service manager's stop is Ctrl-C
    _ensure_ray(address)
    import ray
    from ray import serve as ray_serve

    try:
        url = serve_mod.start(cfg)
        typer.echo(f"serving {', '.join(cfg.classifier)}" + (f" + {cfg.detector}" if cfg.detector else ""))
        if detach:  # the application outlives this driver on the cluster
            typer.echo(f"page: {url} on the cluster's head   API: {url}predict   (stop: serve shutdown)")
            return
        typer.echo(f"page: {url}   API: {url}predict   (Ctrl-C stops)")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        typer.echo("stopping")
    except RuntimeError as exc:  # the replicas could not start (e.g. weights that do not fit the config)
        raise UserError(f"the service did not start: {serve_mod.root_cause(exc)}") from None
    finally:
        if ray.is_initialized():
            try:
                if local:
                    ray_serve.shutdown()
                elif not detach:
                    ray_serve.delete(serve_mod.APP_NAME)
            finally:
                ray.shutdown()
    typer.echo("stopped")


@app.command()
@_one_line_errors
def morphology(
    corpus: Annotated[
        str,
        typer.Argument(
            help="Corpus with instance masks (masks/<stack>/<stem>.png), or any corpus with --segmenter: "
            "folder or s3://."
        ),
    ],
    out: Annotated[str, typer.Option(help="Folder or s3:// prefix for cells.parquet and images.parquet.")],
    segmenter: Annotated[
        str | None,
        typer.Option(help="Segmenter artifact: measure the masks it predicts for every image instead of the corpus's."),
    ] = None,
    endpoint_url: EndpointOpt = None,
    address: AddressOpt = None,
) -> None:
    """Cell morphology from a corpus's instance masks (or a segmenter's): one Parquet row per cell and
    one per image."""
    from . import morphology as morph

    _ensure_ray(address)
    seg = _absolute(segmenter) if segmenter else None
    r = morph.measure_corpus(_absolute(corpus), _absolute(out), endpoint_url, segmenter=seg)
    what = "unreadable images" if seg else "unreadable masks"
    typer.echo(f"{r['n_images']} images ({r['errors']} {what}), {r['n_cells']} cells")
    typer.echo(f"  per image: {r['images']}\n  per cell:  {r['cells']}")


@app.command("train-potency")
@_one_line_errors
def train_potency(
    features: Annotated[str, typer.Argument(help="Parquet table, one row per image: vessel, day, features, target.")],
    out: Annotated[str, typer.Option(help="Run folder: a local folder or s3://bucket/prefix.")],
    target: Annotated[str, typer.Option(help="Column with the measured potency.")] = "potency",
    folds: Annotated[int, typer.Option(help="Outer folds over vessels (held-out figures).")] = 5,
    samples: Annotated[int, typer.Option(help="LightGBM parameter sets searched with Ray Tune.")] = 12,
    seed: Annotated[int, typer.Option(help="Seed of the search and the model.")] = 0,
    endpoint_url: EndpointOpt = None,
    address: AddressOpt = None,
) -> None:
    """Potency from morphology: LightGBM per vessel-day, nested by vessel, searched on Ray Tune."""
    from . import potency

    job = potency.PotencyJobConfig(
        features=_absolute(features),
        out=_absolute(out),
        target=target,
        folds=folds,
        samples=samples,
        seed=seed,
        endpoint_url=endpoint_url,
    )
    job.validate()
    _ensure_ray(address)
    s = potency.train_potency(job)
    m = s["metrics"]
    typer.echo(
        f"held-out vessels ({m['vessels']} vessels, {m['vessel_days']} vessel-days, {folds} folds): "
        f"R² {m['r2']:.3f}, Spearman ρ {m['spearman']:.3f}, MAE {m['mae']:.3g}"
    )
    typer.echo(f"artifact: {storage.join(job.out, 'artifact')}; plots, predictions and summary under {out}")


@app.command("report")
@_one_line_errors
def report_cmd(
    report_uri: Annotated[str, typer.Argument(help="Report location written by `msc-ray score`.")],
    plots: Annotated[
        Path | None,
        typer.Option(
            help="Folder for the PNG plots (default: beside the report, REPORT-plots; ./report-plots for s3://)."
        ),
    ] = None,
    endpoint_url: EndpointOpt = None,
) -> None:
    """Counts per band, stack and status, and PNG plots of a scoring report."""
    from . import report as report_mod

    summary, files = report_mod.report(report_uri, plots, endpoint_url)
    for line in report_mod.lines(summary):
        typer.echo(line)
    for what, path in files.items():
        typer.echo(f"  plot {what}: {path}")


@app.command()
@_one_line_errors
def quickstart(
    out: Annotated[Path, typer.Option(help="Folder for every output of the run.")] = Path("quickstart-out"),
    n: Annotated[int, typer.Option("--n", help="Synthetic single-stack training images.")] = QuickstartConfig.n,
    size: Annotated[int, typer.Option(help="Synthetic image side in pixels.")] = QuickstartConfig.size,
    max_epochs: Annotated[int, typer.Option(help="Epochs per classifier trial at most.")] = QuickstartConfig.max_epochs,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic corpus, folds and search.")] = QuickstartConfig.seed,
) -> None:
    """Run the main job end to end on embedded defaults and print where the outputs are."""
    from .quickstart import run

    outputs = run(QuickstartConfig(out=str(out), n=n, size=size, max_epochs=max_epochs, seed=seed))
    from .quickstart import heldout_lines

    typer.echo("quickstart finished.")
    held = __import__("json").loads(Path(outputs["heldout"]).read_text())
    for line in heldout_lines(held):
        typer.echo(line)
    typer.echo("outputs:")
    for what, path in outputs.items():
        typer.echo(f"  {what:12s} {path}")
    typer.echo(
        "one image at a time, on a page: msc-ray serve "
        f"--classifier {outputs['classifier']} --detector {outputs['detector']}"
    )


if __name__ == "__main__":
    app()
