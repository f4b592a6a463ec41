"""``msc-ray tune``, ``train-detector`` and ``train-segmenter``: the searches and the per-fold Ray Train runs."""

from __future__ import annotations

import dataclasses
from typing import Annotated

import typer

from .. import storage
from .common import (
    PRECISION_CHOICES,
    AddressOpt,
    CpusPerWorkerOpt,
    CropOpt,
    EndpointOpt,
    FoldsOpt,
    GpuOpt,
    LrOpt,
    MinEpochsOpt,
    OnlyFoldsOpt,
    PlacementOpt,
    PrecisionOpt,
    SeedOpt,
    UserError,
    WorkersOpt,
    _absolute,
    _ensure_ray,
    _manifest_for,
    _one_line_errors,
    _per_fold_job,
    _range,
    _run_per_fold,
    app,
)


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
    backbones: Annotated[str, typer.Option(help="Comma-separated registry names.")] = "coverage_unet,compact_cnn",
    folds: FoldsOpt = 5,
    max_epochs: Annotated[
        int, typer.Option(help="Epochs per trial at most (0: by stack — 25 single-stack, 60 multi-stack).")
    ] = 0,
    patience: Annotated[
        int,
        typer.Option(
            help="Epochs without a better inner-validation ROC-AUC before a trial stops (0: by stack — 6 "
            "single-stack; multi-stack trials run their whole schedule and keep their best epoch)."
        ),
    ] = 0,
    min_epochs: Annotated[
        int,
        typer.Option(help="Epochs before a best epoch is kept and a trial can stop early (0: half of --max-epochs)."),
    ] = 0,
    samples: Annotated[int, typer.Option(help="Learning-rate/weight-decay samples per (backbone, fold).")] = 1,
    lr: Annotated[
        str, typer.Option(help="Learning rate, or a range LO:HI sampled log-uniformly per trial.")
    ] = "1e-3:3e-3",
    weight_decay: Annotated[
        str, typer.Option(help="Weight decay, or a range LO:HI sampled log-uniformly per trial.")
    ] = "1e-6:1e-3",
    inner_fold: Annotated[
        str,
        typer.Option(
            help="What the fold after each outer fold does: validate (backbone choice, ASHA, best epoch and "
            "temperature are read on it; three of five folds train) or train (only with one backbone, one "
            "--lr and one --weight-decay: four of five folds train for the whole schedule, and each outer "
            "fold's temperature is fitted on the other folds' outer outputs)."
        ),
    ] = "validate",
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
        float | None,
        typer.Option(
            help="Weight of the coverage term beside the band and confluence losses (default: the stack's, "
            "3 single-stack, 16 multi-stack)."
        ),
    ] = None,
    average_epochs: Annotated[
        float,
        typer.Option(
            help="Validate, keep and export a moving average of the weights over about this many epochs of "
            "steps instead of the last step's weights (0: the last step's)."
        ),
    ] = 2.0,
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
        str,
        typer.Option(
            help="auto (cached ImageNet weights if present), none, a state-dict file, or a classifier artifact "
            "(folder or s3://) of the same backbone whose weights but its head start every trial: transfer, "
            "e.g. a single-stack model for a multi-stack search."
        ),
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
    from .. import corpus as corpus_mod
    from .. import models
    from .. import tune as tune_mod

    names = tuple(b.strip() for b in backbones.split(",") if b.strip())
    for b in names:
        models.backbone(b)
    lr_min, lr_max = _range(lr, "--lr")
    wd_min, wd_max = _range(weight_decay, "--weight-decay")
    out = _absolute(out)
    job = tune_mod.TuneJobConfig(
        manifest="",  # set once the options are known to be right: a wrong one indexes nothing
        out=out,
        stack=stack,
        backbones=names,
        max_epochs=max_epochs,
        patience=patience,
        min_epochs=min_epochs,
        samples=samples,
        lr_min=lr_min,
        lr_max=lr_max,
        wd_min=wd_min,
        wd_max=wd_max,
        inner_fold=inner_fold,
        warmup_epochs=warmup_epochs,
        batch_size=batch_size,
        augment_on=augment_on,
        precision=precision,
        size=size,
        views=views,
        coverage=coverage,
        coverage_weight=coverage_weight,
        average_epochs=average_epochs,
        channels=channels,
        pretrained=pretrained,
        asha=asha,
        cpus_per_trial=cpus_per_trial,
        gpus_per_trial=gpus_per_trial,
        max_concurrent=max_concurrent,
        seed=seed,
        endpoint_url=endpoint_url,
    )
    job.check_options()
    manifest = _manifest_for(corpus_or_manifest, out, folds, seed, endpoint_url, reuse=resume)
    job = dataclasses.replace(job, manifest=manifest)
    info = corpus_mod.manifest_info(corpus_mod.read_manifest(manifest, endpoint_url))
    job.check_stack(info["classes"])  # the options were checked above
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
    crop: CropOpt = 0,
    batch_size: Annotated[int, typer.Option(help="Images per worker per step.")] = 4,
    lr: LrOpt = 1e-3,
    seed: SeedOpt = 0,
    precision: PrecisionOpt = "auto",
    endpoint_url: EndpointOpt = None,
    address: AddressOpt = None,
) -> None:
    """RetinaNet for abnormal cells with Ray Train (DDP) per fold → Table 2, a panel, a detector artifact.
    Rerunning with the same --out resumes every fold from its latest checkpoint."""
    from .. import detect

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
    crop: CropOpt = 0,
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
    from .. import segment

    job = _per_fold_job(
        segment.SegmentJobConfig, corpus_or_manifest, out, folds, only_folds, locals(), stack=stack, views=views
    )
    _run_per_fold(job, segment.train_segmenter, address)
