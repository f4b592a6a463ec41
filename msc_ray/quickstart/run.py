"""The quickstart's steps in order, each writing under one output folder."""

from __future__ import annotations

import time
from pathlib import Path

from .. import use_local_ray_env
from .config import QuickstartConfig
from .judge import judge
from .steps import (
    _quiet,
    make_corpora,
    score_heldout,
    train_abnormal_detector,
    train_cell_segmenter,
    train_classifier,
    train_potency_model,
)


def run(cfg: QuickstartConfig) -> dict[str, Path]:
    """Run every step; returns ``{what: path}`` of the outputs worth opening."""
    import os

    started = time.perf_counter()
    out = Path(cfg.out).resolve()
    # before anything imports Ray's core (the corpus steps do), which reads these once: Ray 2.60 turns
    # token authentication on for a local Ray and says so on the console; asking for it explicitly keeps
    # it on without the message
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    corpus, heldout, sheet, manifest = make_corpora(cfg, out)
    import ray

    if not ray.is_initialized():
        # a Ray of its own: a bare ray.init() would join any `ray start` cluster on this host instead
        use_local_ray_env()
        ray.init(address="local", include_dashboard=False, configure_logging=False, log_to_driver=False)
    _quiet()
    outcome = train_classifier(cfg, manifest, out)
    det = train_abnormal_detector(cfg, manifest, out)
    seg = train_cell_segmenter(cfg, manifest, out)
    pot = train_potency_model(cfg, corpus, out, seg["artifact"])
    report_dir, plots = score_heldout(
        heldout, outcome.outputs["artifact"], det["artifact"], out, seg["artifact"], pot["artifact"]
    )
    held_path = judge(report_dir, heldout, out, cfg.heldout_seed, started)
    return {
        "corpus": corpus,
        "preview": sheet,
        "manifest": Path(manifest),
        "table": Path(outcome.outputs["table_md"]),
        "winner_plot": Path(outcome.outputs["plots"]),
        "classifier": Path(outcome.outputs["artifact"]),
        "detector_table": Path(det["table_md"]),
        "detections": Path(det["panel"]),
        "detector": Path(det["artifact"]),
        "segmenter_table": Path(seg["table_md"]),
        "segmentation": Path(seg["panel"]),
        "segmenter": Path(seg["artifact"]),
        "potency_plot": Path(pot["plot"]),
        "potency": Path(pot["artifact"]),
        "report": report_dir,
        "heldout": held_path,
        **{f"plot_{k}": Path(v) for k, v in plots.items()},
    }
