"""``msc-ray score`` and ``msc-ray report``: an archive scored into a Parquet report, and its counts and plots."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import AddressOpt, EndpointOpt, _absolute, _classifier_entry, _ensure_ray, _one_line_errors, app


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
    from .. import score as score_mod

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
    from .. import report as report_mod

    summary, files = report_mod.report(report_uri, plots, endpoint_url)
    for line in report_mod.lines(summary):
        typer.echo(line)
    for what, path in files.items():
        typer.echo(f"  plot {what}: {path}")
