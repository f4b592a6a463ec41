"""The main job end to end on embedded defaults: what ``scripts/quickstart`` runs.

Every capability joins here as it lands; each step writes under one output folder and the paths of
what a person should look at are returned (and printed by the CLI)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuickstartConfig:
    out: str = "quickstart-out"
    n: int = 40  # images per stack
    size: int = 128
    seed: int = 0


def run(cfg: QuickstartConfig) -> dict[str, Path]:
    """Run every step; returns ``{what: path}`` of the outputs worth opening."""
    from . import synth

    out = Path(cfg.out)
    corpus = out / "corpus"
    log.info("step 1: synthetic corpus (%d images per stack, %d px) → %s", cfg.n, cfg.size, corpus)
    rows = synth.synthesize(corpus, synth.SynthConfig(n=cfg.n, size=cfg.size, seed=cfg.seed))
    sheet = synth.preview(corpus, rows, out / "plots" / "corpus_preview.png")
    return {"corpus": corpus, "truth": corpus / "truth.parquet", "preview": sheet}
