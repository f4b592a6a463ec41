"""``msc-ray synth`` and ``msc-ray index``: a synthetic corpus, and a corpus indexed into grouped folds."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import EndpointOpt, _one_line_errors, app


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
    from .. import synth as synth_mod

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
    from .. import corpus as corpus_mod

    table, summary = corpus_mod.index_corpus(corpus, folds=folds, seed=seed, endpoint_url=endpoint_url)
    dest = corpus_mod.write_manifest(table, out or corpus_mod.default_manifest_uri(corpus), endpoint_url)
    for line in summary.lines():
        typer.echo(line)
    typer.echo(f"manifest: {dest}")
