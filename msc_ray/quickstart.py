"""The main job end to end on embedded defaults: what ``scripts/quickstart`` runs.

synthetic corpus → index (grouped 5-fold) → classifier search on Ray Tune (two small backbones, five
folds, a few epochs) → abnormal-cell detector on Ray Train (RetinaNet, two DDP workers, five folds)
→ scoring a local archive that includes broken files → report counts and plots.
Every step writes under one output folder; the paths worth opening are returned and printed.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuickstartConfig:
    out: str = "quickstart-out"
    n: int = 80  # synthetic images per stack: 6 vessels × 3 days × 5 positions, enough for 5 grouped folds
    size: int = 128  # stored image side
    input_size: int = 64  # classifier input side
    backbones: tuple[str, ...] = ("resnet18", "mobilenet_v3_small")
    folds: int = 5
    max_epochs: int = 3
    detector_epochs: int = 2
    seed: int = 0


def _archive(corpus: Path, dest: Path) -> int:
    """A production-like archive: the single-stack images as a camera would leave them, plus a
    truncated file, an empty one and a stray non-image. Returns the number of image objects."""
    if dest.exists():
        shutil.rmtree(dest)
    n = 0
    for img in sorted((corpus / "sstack").glob("[0-9]*/*.png")):
        target = dest / "sstack" / img.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(img, target)
        n += 1
    first = sorted((dest / "sstack").glob("*.png"))[0]
    (dest / "sstack" / "S900_d01_c.png").write_bytes(first.read_bytes()[:300])  # truncated upload
    (dest / "sstack" / "S901_d01_c.png").write_bytes(b"")  # empty object
    (dest / "sstack" / "upload.log").write_text("camera 3 restarted\n")
    return n + 2


def run(cfg: QuickstartConfig) -> dict[str, Path]:
    """Run every step; returns ``{what: path}`` of the outputs worth opening."""
    import ray

    from . import corpus as corpus_mod
    from . import detect, report, score, synth
    from . import tune as tune_mod

    t_all = time.perf_counter()
    out = Path(cfg.out)
    corpus = out / "corpus"
    log.info("step 1/6: synthetic corpus (%d images per stack, %d px) → %s", cfg.n, cfg.size, corpus)
    if corpus.exists():
        shutil.rmtree(corpus)
    rows = synth.synthesize(corpus, synth.SynthConfig(n=cfg.n, size=cfg.size, seed=cfg.seed, workers=2))
    sheet = synth.preview(corpus, rows, out / "plots" / "corpus_preview.png")

    log.info("step 2/6: index with %d folds grouped by vessel", cfg.folds)
    table, summary = corpus_mod.index_corpus(str(corpus), folds=cfg.folds, seed=cfg.seed)
    manifest = corpus_mod.write_manifest(table, str(out / "manifest.parquet"))
    for line in summary.lines():
        log.info("%s", line)

    if not ray.is_initialized():
        ray.init(include_dashboard=False, configure_logging=False, log_to_driver=False)
    run_dir = out / "classifier"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    log.info(
        "step 3/6: classifier search on Ray Tune: %s × %d folds, up to %d epochs",
        ", ".join(cfg.backbones),
        cfg.folds,
        cfg.max_epochs,
    )
    job = tune_mod.TuneJobConfig(
        manifest=manifest,
        out=str(run_dir),
        stack="sstack",
        backbones=cfg.backbones,
        max_epochs=cfg.max_epochs,
        patience=2,
        samples=1,
        size=cfg.input_size,
        batch_size=16,
        pretrained="auto",
        seed=cfg.seed,
    )
    outcome = tune_mod.run_search(job)
    log.info("winner: %s", outcome.winner)

    det_dir = out / "detector"
    if det_dir.exists():
        shutil.rmtree(det_dir)
    log.info(
        "step 4/6: abnormal-cell detector on Ray Train: RetinaNet (ResNet-18 FPN), 2 DDP workers, %d folds, %d epochs",
        cfg.folds,
        cfg.detector_epochs,
    )
    det = detect.train_detector(
        detect.DetectJobConfig(
            manifest=manifest,
            out=str(det_dir),
            epochs=cfg.detector_epochs,
            workers=2,
            cpus_per_worker=0.5,
            backbone="resnet18_fpn",
            size=cfg.size,
            batch_size=4,
            seed=cfg.seed,
        )
    )

    archive = out / "archive"
    n_objects = _archive(corpus, archive)
    report_dir = out / "report"
    if report_dir.exists():
        shutil.rmtree(report_dir)
    log.info("step 5/6: scoring %d archived images (2 of them broken) → %s", n_objects, report_dir)
    s = score.score_archive(
        score.ScoreConfig(
            archive=str(archive),
            classifier=outcome.outputs["artifact"],
            detector=det["artifact"],
            out=str(report_dir),
            stack="sstack",
        )
    )
    log.info("scored %d objects, %d error rows, %d non-images ignored", s.scored, s.errors, s.ignored)

    log.info("step 6/6: report and plots")
    counts, plots = report.report(str(report_dir), out / "plots")
    for line in report.lines(counts):
        log.info("%s", line)
    log.info("quickstart took %.1f minutes", (time.perf_counter() - t_all) / 60)
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
        "report": report_dir,
        **{f"plot_{k}": Path(v) for k, v in plots.items()},
    }
