"""``msc-ray quickstart``: the main job end to end on embedded defaults."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ..quickstart import QuickstartConfig
from .common import _one_line_errors, app


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
    from ..quickstart import run

    outputs = run(QuickstartConfig(out=str(out), n=n, size=size, max_epochs=max_epochs, seed=seed))
    from ..quickstart import heldout_lines

    typer.echo("quickstart finished.")
    held = json.loads(Path(outputs["heldout"]).read_text())
    for line in heldout_lines(held):
        typer.echo(line)
    typer.echo("outputs:")
    for what, path in outputs.items():
        typer.echo(f"  {what:12s} {path}")
    typer.echo(
        "one image at a time, on a page: msc-ray serve "
        f"--classifier {outputs['classifier']} --detector {outputs['detector']}"
    )
