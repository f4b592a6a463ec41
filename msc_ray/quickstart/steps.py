"""The quickstart's steps: corpora, the four models, and the archive of new vessels scored with them."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from .config import QuickstartConfig

log = logging.getLogger(__name__)


def _archive(heldout: Path, dest: Path) -> int:
    """A production-like archive of images no model saw: the held-out corpus's single-stack images
    as a camera would leave them, plus a truncated file, an empty one and a stray non-image.
    Returns the number of image objects."""
    if dest.exists():
        shutil.rmtree(dest)
    n = 0
    for img in sorted((heldout / "sstack").glob("[0-9]*/*.png")):
        target = dest / "sstack" / img.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(img, target)
        n += 1
    first = sorted((dest / "sstack").glob("*.png"))[0]
    (dest / "sstack" / "S900_d01_c.png").write_bytes(first.read_bytes()[:300])  # truncated upload
    (dest / "sstack" / "S901_d01_c.png").write_bytes(b"")  # empty object
    (dest / "sstack" / "upload.log").write_text("camera 3 restarted\n")
    return n + 2


def _quiet() -> None:
    """Console output cut to progress and paths: no Ray Data progress bars, no Ray INFO lines."""
    import os

    import ray

    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")

    ray.data.DataContext.get_current().enable_progress_bars = False
    for name in ("ray", "ray.tune", "ray.train"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # "progress bars disabled" and the like


def _fresh(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    return path


def make_corpora(cfg: QuickstartConfig, out: Path) -> tuple[Path, Path, Path, str]:
    """Steps 1–2: the training corpus (and its contact sheet), the held-out corpus of new vessels,
    the manifest. Returns (corpus, held-out corpus, contact sheet, manifest URI)."""
    from .. import corpus as corpus_mod
    from .. import synth

    corpus, heldout = _fresh(out / "corpus"), _fresh(out / "heldout")
    log.info("step 1/9: synthetic corpus (%d single-stack images, %d px) → %s", cfg.n, cfg.size, corpus)
    rows = synth.synthesize(corpus, synth.SynthConfig(n=cfg.n, size=cfg.size, stack="sstack", seed=cfg.seed, workers=2))
    sheet = synth.preview(corpus, rows, out / "plots" / "corpus_preview.png")
    held = synth.SynthConfig(n=cfg.heldout_n, size=cfg.size, stack="sstack", seed=cfg.heldout_seed, workers=2)
    synth.synthesize(heldout, held)
    log.info("step 2/9: index with %d folds grouped by vessel", cfg.folds)
    table, _ = corpus_mod.index_corpus(str(corpus), folds=cfg.folds, seed=cfg.seed)
    return corpus, heldout, sheet, corpus_mod.write_manifest(table, str(out / "manifest.parquet"))


def train_classifier(cfg: QuickstartConfig, manifest: str, out: Path):
    """Step 3: the backbone × outer-fold search on Ray Tune and the exported classifier."""
    from .. import tune as tune_mod

    log.info(
        "step 3/9: classifier search on Ray Tune: %s × %d outer folds, up to %d epochs",
        ", ".join(cfg.backbones),
        cfg.folds,
        cfg.max_epochs,
    )
    job = tune_mod.TuneJobConfig(
        manifest=manifest,
        out=str(_fresh(out / "classifier")),
        stack="sstack",
        backbones=cfg.backbones,
        max_epochs=cfg.max_epochs,
        patience=cfg.patience,
        samples=1,
        lr_min=cfg.lr,
        lr_max=cfg.lr,
        wd_min=1e-5,
        wd_max=1e-5,
        size=cfg.input_size,
        batch_size=32,
        pretrained="none",
        seed=cfg.seed,
        verbose=0,
    )
    outcome = tune_mod.run_search(job)
    log.info("winner: %s; Table 1 (outer folds) → %s", outcome.winner["backbone"], outcome.outputs["table_md"])
    return outcome


def train_abnormal_detector(cfg: QuickstartConfig, manifest: str, out: Path) -> dict:
    """Step 4: RetinaNet on Ray Train with two DDP workers, per outer fold."""
    from .. import detect

    log.info(
        "step 4/9: abnormal-cell detector on Ray Train: RetinaNet (compact FPN), 2 DDP workers, outer folds "
        "%s, up to %d epochs",
        ",".join(map(str, cfg.detector_folds)),
        cfg.detector_epochs,
    )
    job = detect.DetectJobConfig(
        manifest=manifest,
        out=str(_fresh(out / "detector")),
        folds=cfg.detector_folds,
        epochs=cfg.detector_epochs,
        patience=5,
        workers=2,
        cpus_per_worker=1.0,
        backbone="compact_fpn",
        size=cfg.size,
        batch_size=4,
        seed=cfg.seed,
    )
    return detect.train_detector(job)


def train_cell_segmenter(cfg: QuickstartConfig, manifest: str, out: Path) -> dict:
    """Step 5: the cell and nucleus segmenter (U-Net + watershed) on Ray Train (two DDP workers),
    outer fold 0, on ``segmenter_images`` images spread over every vessel (so over every fold) at
    ``segmenter_size``."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from .. import corpus as corpus_mod
    from .. import segment

    table = pq.read_table(manifest)
    df = table.select(["path", "vessel", "day", "position"]).to_pandas().sort_values(["vessel", "day", "position"])
    step = max(1, -(-len(df) // cfg.segmenter_images))
    chosen = df.groupby("vessel", group_keys=False)["path"].apply(lambda p: p.iloc[::step]).tolist()
    subset = table.filter(pc.is_in(table["path"], value_set=pa.array(chosen)))
    sub_manifest = corpus_mod.write_manifest(subset, str(out / "segmenter_manifest.parquet"))
    log.info(
        "step 5/9: cell/nucleus segmenter on Ray Train: U-Net + watershed, 2 DDP workers, %d images of "
        "all %d vessels at %d px, outer fold 0, %d epochs",
        subset.num_rows,
        df["vessel"].nunique(),
        cfg.segmenter_size,
        cfg.segmenter_epochs,
    )
    job = segment.SegmentJobConfig(
        manifest=sub_manifest,
        out=str(_fresh(out / "segmenter")),
        folds=(0,),
        epochs=cfg.segmenter_epochs,
        workers=2,
        cpus_per_worker=1.0,
        size=cfg.segmenter_size,
        batch_size=2,  # about 60 training images: small batches give the U-Net enough steps
        views=cfg.segmenter_views,
        seed=cfg.seed,
    )
    res = segment.train_segmenter(job)
    (row,) = res["folds"]
    log.info(
        "segmenter on outer fold 0: mask AP@0.5 cells %.3f, nuclei %.3f; cell count error %.3f → %s",
        row["cell_mask_ap50"],
        row["nucleus_mask_ap50"],
        row["cell_count_error"],
        res["table_md"],
    )
    return res


def train_potency_model(cfg: QuickstartConfig, corpus: Path, out: Path, segmenter: str) -> dict:
    """Step 6: morphology of every training image from the segmenter's masks (what scoring will
    measure), then the potency model (LightGBM per vessel-day on Ray Tune, outer folds over vessels).
    The segmenter trained on some of these images: its masks there are a little better than on new
    vessels; the figure that counts is step 9's, on new vessels."""
    import pyarrow.parquet as pq

    from .. import morphology, potency

    log.info(
        "step 6/9: morphology of the %d training images from the segmenter's masks → potency model (LightGBM on Ray "
        "Tune, folds by vessel)",
        cfg.n,
    )
    feats = morphology.measure_corpus(str(corpus), str(_fresh(out / "morphology")), segmenter=segmenter)
    n_vessels = len(set(pq.read_table(feats["images"], columns=["vessel"])["vessel"].to_pylist()))
    job = potency.PotencyJobConfig(
        features=feats["images"],
        out=str(_fresh(out / "potency")),
        folds=max(2, min(4, n_vessels)),
        samples=cfg.potency_samples,
        seed=cfg.seed,
    )
    summary = potency.train_potency(job)
    m = summary["metrics"]
    log.info(
        "potency on held-out vessels of the training corpus (%d vessel-days): R² %.3f, Spearman ρ %.3f, MAE %.2f",
        m["vessel_days"],
        m["r2"],
        m["spearman"],
        m["mae"],
    )
    return {"artifact": str(Path(job.out) / "artifact"), "plot": str(Path(job.out) / "predicted_vs_true.png")}


def score_heldout(
    heldout: Path, classifier: str, detector: str, out: Path, segmenter: str | None = None, potency: str | None = None
) -> tuple[Path, dict[str, str]]:
    """Steps 7–8: score the archive of new vessels (with broken files) with every model and report on it."""
    from .. import report, score

    n_objects = _archive(heldout, out / "archive")
    report_dir = _fresh(out / "report")
    log.info("step 7/9: scoring %d archived images of new vessels (2 of them broken) → %s", n_objects, report_dir)
    s = score.score_archive(
        score.ScoreConfig(
            archive=str(out / "archive"),
            classifier=classifier,
            detector=detector,
            segmenter=segmenter,
            potency=potency,
            out=str(report_dir),
            stack="sstack",
        )
    )
    log.info("scored %d objects, %d error rows, %d non-images ignored", s.scored, s.errors, s.ignored)
    log.info("step 8/9: report and plots")
    counts, plots = report.report(str(report_dir), out / "plots")
    for line in report.lines(counts):
        log.info("%s", line)
    return report_dir, plots
