"""The typer app, its one-line errors and what the commands share (Ray start-up, manifests, options)."""

from __future__ import annotations

import functools
import logging
from typing import Annotated

import typer

from .. import storage, use_local_ray_env
from ..storage import StorageError

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


# --precision's choices: the rule of engine.use_bf16
PRECISION_CHOICES = (
    "bf16 (bfloat16 autocast), fp32, or auto (bf16 on a GPU and on a CPU with bfloat16 in hardware, AMX or "
    "AVX-512 BF16; fp32 otherwise)"
)


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


CropOpt = Annotated[
    int,
    typer.Option(
        help="Train on random crop × crop windows of the --size images (their masks or boxes with them) and "
        "stop early on the centred window of each inner image; the outer folds and the artifact read whole "
        "images. Sharper images at the cost of smaller ones. 0: whole images."
    ),
]


LrOpt = Annotated[float, typer.Option(help="AdamW learning rate (after a one-epoch warm-up; cosine decay).")]


SeedOpt = Annotated[int, typer.Option(help="Seed of folds, shards and augmentation.")]


PrecisionOpt = Annotated[
    str,
    typer.Option(help=f"Arithmetic of the training steps: {PRECISION_CHOICES}. Validation and outer folds: fp32."),
]


def _ensure_ray(address: str | None = None) -> None:
    """Connect to ``address`` / ``RAY_ADDRESS`` when given, else start a local Ray."""
    import os

    import ray

    if not ray.is_initialized():
        addr = address or os.environ.get("RAY_ADDRESS")
        local = {}
        if not addr:
            # a Ray started here gets msc-ray's settings; it has no dashboard, so no State API: quiet Ray
            # Train's per-second warning about that
            use_local_ray_env()
            local = {"runtime_env": {"worker_process_setup_hook": "msc_ray.quiet_worker_logs"}}
        ctx = ray.init(
            address=addr or None, include_dashboard=False, configure_logging=False, log_to_driver=True, **local
        )
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
    from .. import corpus as corpus_mod
    from .. import storage

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
    from ..score import classifier_entries

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


def _per_fold_job(cls, corpus_or_manifest: str, out: str, folds: int, only_folds: str, options: dict, **extra):
    """train-detector's or train-segmenter's job (``cls``) from their options: absolute paths, the outer
    folds to run, the manifest (indexed into ``OUT/manifest.parquet`` from a corpus; a rerun keeps the
    folds it started with). The options are checked before anything is indexed: a wrong one is its own
    one-line error, not one that waits for a corpus to be read."""
    from dataclasses import replace

    out = _absolute(out)
    shared = ("epochs", "patience", "min_epochs", "workers", "gpu", "cpus_per_worker", "backbone", "size", "crop")
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
