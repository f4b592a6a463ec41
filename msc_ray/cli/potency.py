"""``msc-ray morphology`` and ``train-potency``: morphology from masks, and the LightGBM potency model."""

from __future__ import annotations

from typing import Annotated

import typer

from .. import check_views, storage
from .common import AddressOpt, EndpointOpt, UserError, _absolute, _ensure_ray, _one_line_errors, app


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
    views: Annotated[
        int,
        typer.Option(
            help="With --segmenter (a U-Net): test-time views its maps are averaged over (1, 4 or 8); "
            "0 keeps the artifact's own. Fewer views cost less on large images."
        ),
    ] = 0,
    endpoint_url: EndpointOpt = None,
    address: AddressOpt = None,
) -> None:
    """Cell morphology from a corpus's instance masks (or a segmenter's): one Parquet row per cell and
    one per image."""
    from .. import morphology as morph

    if views:  # checked before Ray starts
        if not segmenter:
            raise UserError(f"--views {views} needs --segmenter (the corpus's own masks have no views)")
        check_views(views, f"--views {views}")
    _ensure_ray(address)
    seg = _absolute(segmenter) if segmenter else None
    r = morph.measure_corpus(_absolute(corpus), _absolute(out), endpoint_url, segmenter=seg, views=views)
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
    from .. import potency

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
