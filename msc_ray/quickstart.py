"""The main job end to end on embedded defaults: what ``scripts/quickstart`` runs.

synthetic corpus → index (grouped 5-fold) → classifier search on Ray Tune (two small backbones, five
outer folds, nested early stopping) → abnormal-cell detector on Ray Train (RetinaNet, two DDP workers)
→ scoring an archive of new vessels (another seed) that includes broken files → report counts and
plots → the archive's predictions against the truth of its images (``heldout_metrics.json``).
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
    n: int = 480  # synthetic single-stack training images: 32 vessels × 3 days × 5 positions
    heldout_n: int = 200  # images of new vessels (another seed) in the archive that is scored
    size: int = 128  # stored image side (the detector's input)
    input_size: int = 64  # classifier input side: confluence is a low-frequency property
    backbones: tuple[str, ...] = ("compact_cnn", "mobilenet_v3_small")
    folds: int = 5
    max_epochs: int = 20
    patience: int = 5
    lr: float = 2e-3
    detector_folds: tuple[int, ...] = (0,)  # outer folds the detector's Table 2 covers (~3 min each)
    detector_epochs: int = 12
    seed: int = 0
    heldout_seed: int = 2026  # never looked at while choosing the recipe (those experiments used seed 1000)


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


def heldout_metrics(report_table, truth_table) -> dict:
    """The scored archive against the synthetic truth of its images (joined by file name): band
    accuracy and confusion, confluence MAE (points), and abnormal cells per box and per image at the
    detector's own operating point."""
    import numpy as np

    from . import BAND_NAMES, metrics

    truth = {r["image"].rsplit("/", 1)[-1]: r for r in truth_table.to_pylist()}
    y, pred, err, preds, truths, probs = [], [], [], [], [], []
    for row in report_table.to_pylist():
        t = truth.get(row["key"].rsplit("/", 1)[-1])
        if row["status"] != "ok" or t is None:
            continue
        y.append(int(t["class"]) - 1)
        pred.append(BAND_NAMES.index(row["predicted_class"]))
        probs.append(row["probabilities"])
        err.append(abs(row["confluence_pct"] - 100 * t["confluence"]))
        boxes = row.get("abnormal_boxes") or []
        preds.append(
            (
                np.array([[b["x1"], b["y1"], b["x2"], b["y2"]] for b in boxes], np.float32).reshape(-1, 4),
                np.array([b["score"] for b in boxes], np.float32),
            )
        )
        truths.append(np.asarray(t["boxes"] or [], np.float32).reshape(-1, 4))
    from sklearn.metrics import accuracy_score, confusion_matrix

    det = metrics.detection_metrics(preds, truths, 0.0)  # the report holds boxes above the threshold only
    return {
        "images": len(y),
        "band_accuracy": float(accuracy_score(y, pred)),
        "confusion": confusion_matrix(y, pred, labels=list(range(len(BAND_NAMES)))).tolist(),
        "confluence_mae_points": float(np.mean(err)),
        "ece": metrics.expected_calibration_error(np.array(y), np.array(probs)),
        "abnormal_box_hit_rate": det["hit_rate"],
        "abnormal_box_fdr": det["fdr"],
        "abnormal_image_hit_rate": det["image_hit_rate"],
        "abnormal_image_fdr": det["image_fdr"],
        "abnormal_cells": det["tp"] + det["fn"],
    }


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
    from . import corpus as corpus_mod
    from . import synth

    corpus, heldout = _fresh(out / "corpus"), _fresh(out / "heldout")
    log.info("step 1/7: synthetic corpus (%d single-stack images, %d px) → %s", cfg.n, cfg.size, corpus)
    rows = synth.synthesize(corpus, synth.SynthConfig(n=cfg.n, size=cfg.size, stack="sstack", seed=cfg.seed, workers=2))
    sheet = synth.preview(corpus, rows, out / "plots" / "corpus_preview.png")
    held = synth.SynthConfig(n=cfg.heldout_n, size=cfg.size, stack="sstack", seed=cfg.heldout_seed, workers=2)
    synth.synthesize(heldout, held)
    log.info("step 2/7: index with %d folds grouped by vessel", cfg.folds)
    table, _ = corpus_mod.index_corpus(str(corpus), folds=cfg.folds, seed=cfg.seed)
    return corpus, heldout, sheet, corpus_mod.write_manifest(table, str(out / "manifest.parquet"))


def train_classifier(cfg: QuickstartConfig, manifest: str, out: Path):
    """Step 3: the backbone × outer-fold search on Ray Tune and the exported classifier."""
    from . import tune as tune_mod

    log.info(
        "step 3/7: classifier search on Ray Tune: %s × %d outer folds, up to %d epochs",
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
    from . import detect

    log.info(
        "step 4/7: abnormal-cell detector on Ray Train: RetinaNet (compact FPN), 2 DDP workers, outer folds "
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


def score_heldout(heldout: Path, classifier: str, detector: str, out: Path) -> tuple[Path, dict[str, str]]:
    """Steps 5–6: score the archive of new vessels (with broken files) and report on it."""
    from . import report, score

    n_objects = _archive(heldout, out / "archive")
    report_dir = _fresh(out / "report")
    log.info("step 5/7: scoring %d archived images of new vessels (2 of them broken) → %s", n_objects, report_dir)
    s = score.score_archive(
        score.ScoreConfig(
            archive=str(out / "archive"), classifier=classifier, detector=detector, out=str(report_dir), stack="sstack"
        )
    )
    log.info("scored %d objects, %d error rows, %d non-images ignored", s.scored, s.errors, s.ignored)
    log.info("step 6/7: report and plots")
    counts, plots = report.report(str(report_dir), out / "plots")
    for line in report.lines(counts):
        log.info("%s", line)
    return report_dir, plots


def judge(report_dir: Path, heldout: Path, out: Path, seed: int, started: float) -> Path:
    """Step 7: the report against the truth of the held-out images → heldout_metrics.json."""
    import json

    import pyarrow.parquet as pq

    from . import score

    log.info("step 7/7: the archive against the truth of its images (new vessels, seed %d)", seed)
    held = heldout_metrics(score.read_report(str(report_dir)), pq.read_table(heldout / "truth.parquet"))
    held["minutes"] = (time.perf_counter() - started) / 60
    path = out / "heldout_metrics.json"
    path.write_text(json.dumps(held, indent=2) + "\n")
    for line in heldout_lines(held):
        log.info("%s", line)
    log.info("quickstart took %.1f minutes", held["minutes"])
    return path


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
        ray.init(address="local", include_dashboard=False, configure_logging=False, log_to_driver=False)
    _quiet()
    outcome = train_classifier(cfg, manifest, out)
    det = train_abnormal_detector(cfg, manifest, out)
    report_dir, plots = score_heldout(heldout, outcome.outputs["artifact"], det["artifact"], out)
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
        "report": report_dir,
        "heldout": held_path,
        **{f"plot_{k}": Path(v) for k, v in plots.items()},
    }


def heldout_lines(h: dict) -> list[str]:
    def f(v):
        return "n/a" if v != v else f"{v:.3f}"

    return [
        f"on {h['images']} images of vessels no model saw:",
        f"  band accuracy {f(h['band_accuracy'])}; confusion (rows truth 1-4, columns predicted) {h['confusion']}",
        f"  confluence MAE {h['confluence_mae_points']:.1f} points; calibration error (ECE) {f(h['ece'])}",
        f"  abnormal cells ({h['abnormal_cells']}): per box hit rate {f(h['abnormal_box_hit_rate'])}, FDR "
        f"{f(h['abnormal_box_fdr'])}; per image hit rate {f(h['abnormal_image_hit_rate'])}, FDR "
        f"{f(h['abnormal_image_fdr'])}",
    ]
