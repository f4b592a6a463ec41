#!/usr/bin/env python
"""Table 1 (single- and multi-stack classifier) and Table 2 (abnormal-cell detector) on the synthetic
corpus, with nested folds: every figure is on outer folds that nothing trained, stopped, selected or
calibrated on. Then the exported models score a corpus of new vessels (another seed) against its
truth. Prints the tables, the held-out figures and the settings; writes quality.json.

    .venv/bin/python scripts/quality.py [--n 1600] [--mstack-n 450] [--folds 5]  # CPU, about 29 min
    .venv/bin/python scripts/quality.py --stages segmenter                    # CPU, about 26 min
    python scripts/quality.py --gpu                                            # the study's scale on a GPU

``--stages segmenter`` is the morphology/potency chain: the segmenter (U-Net + watershed by default,
``--segmenter-backbone compact_fpn`` for Mask R-CNN) trained on one corpus (its outer
folds give mask AP, counting and confluence errors), then a corpus of new vessels (another seed) is
segmented by the exported model, measured, and LightGBM potency is fitted and scored with folds
grouped by vessel, once on the predicted masks and once on the exact masks for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

WORKERS = os.cpu_count() or 2  # synthesis processes (the same bytes whatever the count)


def heldout_classifier(artifact: str, heldout: Path, stack: str) -> dict:
    """The exported classifier on every image of ``stack`` in the held-out corpus."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from msc_ray import corpus, data, engine, inference, metrics, models
    from msc_ray.config import DataConfig, from_dict

    model, cfg = models.load_classifier(artifact)
    dcfg = from_dict(DataConfig, cfg["data"])
    table, _ = corpus.index_corpus(str(heldout), folds=3, seed=0)
    cache = data.build_cache(data.select(table, stack=stack), dcfg)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    aug = engine.Augmenter(dcfg, train=False)
    views = inference.artifact_views(cfg)
    # as `msc-ray score` computes it: float32 on CPUs (training may have used bfloat16 autocast)
    precision = "auto" if dev.type == "cuda" else "fp32"
    out = engine.predict(model.to(dev), cache, aug, batch_size=64, device=dev, views=views, precision=precision)
    m = engine.evaluate(out, cache, cfg["classes"], cfg["temperature"])
    truth = pq.read_table(heldout / "truth.parquet").to_pandas().set_index("image")
    conf = truth.loc[[k for k in cache.keys], "confluence"].to_numpy()
    pct = engine.confluence_from_outputs(out, cfg["classes"], cfg["temperature"])
    return {
        "images": len(cache),
        "accuracy": m["accuracy"],
        "confusion": m["confusion"],
        "roc_auc": m["roc_auc"],
        "ece": m["ece"],
        "ece_floor": metrics.ece_floor(metrics.calibrated(out[:, : len(cfg["classes"])], cfg["temperature"])),
        "confluence_mae": float(np.mean(np.abs(pct - 100 * conf))),
        "per_class": m["per_class"],
    }


def bf16_here(precision: str, gpu: bool) -> bool:
    """Whether ``--precision`` means bfloat16 training steps on the device this run trains on."""
    import torch

    from msc_ray import engine

    return engine.use_bf16(torch.device("cuda" if gpu and torch.cuda.is_available() else "cpu"), precision)


def segmenter_stage(out: Path, args, gpu: bool) -> dict:
    """Segmenter on corpus A (outer folds), then potency on new vessels from its predicted masks."""
    from msc_ray import corpus, morphology, potency, segment, synth

    n, size = args.seg_n or (1000 if gpu else 600), args.seg_size or 256
    # CPU: 128-px training crops of the 256-px images, so an epoch costs what 128-px images did while the
    # outer fold, the artifact and the potency corpus are read whole (README "Morphology and potency")
    crop = args.seg_crop if args.seg_crop is not None else (0 if gpu else 128)
    views = args.potency_views if args.potency_views is not None else (0 if gpu else 1)
    # CPU: no early stopping before three quarters of the schedule. The crops' inner windows hold a quarter
    # of the instances and their score stalled mid-schedule (a run stopped at 36 of 60, best 30), while on
    # development corpora 45 epochs beat 30 (docs/measurements.md "Finer pixels")
    min_epochs = args.segmenter_min_epochs if args.segmenter_min_epochs is not None else (0 if gpu else 45)
    backbone = args.segmenter_backbone or ("unet_wide" if gpu else "unet")
    mask_rcnn = not backbone.startswith("unet")  # Mask R-CNN's measured recipe: batch 2, lr 1e-3
    synth.synthesize(out / "seg-corpus", synth.SynthConfig(n=n, size=size, stack="sstack", seed=7, workers=WORKERS))
    table, _ = corpus.index_corpus(str(out / "seg-corpus"), folds=args.folds, seed=0)
    manifest = corpus.write_manifest(table, str(out / "seg-corpus" / "manifest.parquet"))
    t0 = time.perf_counter()
    seg = segment.train_segmenter(
        segment.SegmentJobConfig(
            manifest=manifest,
            out=str(out / "segmenter"),
            folds=tuple(int(f) for f in (args.segmenter_folds or ("" if gpu else "0")).split(",") if f),
            epochs=args.segmenter_epochs,
            min_epochs=min_epochs,
            workers=2 if not gpu else 1,
            gpu=gpu,
            backbone=backbone,
            size=size,
            crop=crop,
            batch_size=2 if mask_rcnn else 8,
            lr=1e-3 if mask_rcnn else 3e-3,
            precision=args.precision,
        )
    )
    minutes = (time.perf_counter() - t0) / 60
    bf16 = bf16_here(args.precision, gpu)
    print(f"\n== Segmentation, cells and nuclei ({minutes:.1f} min)")
    print(Path(seg["table_md"]).read_text())
    pot_n = args.potency_n or (2000 if gpu else 1800)  # 60 vessels: LightGBM needs the vessel-days (600: R² 0.61)
    pot_cfg = synth.SynthConfig(n=pot_n, size=size, stack="sstack", seed=7007, workers=WORKERS)
    synth.synthesize(out / "pot-corpus", pot_cfg)
    res: dict = {"segmenter": {"minutes": minutes, "summary": seg["summary"], "thresholds": seg["thresholds"]}}
    for what, seg_art in (("predicted masks", seg["artifact"]), ("exact masks", None)):
        t0 = time.perf_counter()
        tag = "pred" if seg_art else "exact"
        feats = morphology.measure_corpus(
            str(out / "pot-corpus"), str(out / f"morph-{tag}"), segmenter=seg_art, views=views
        )
        fit = potency.train_potency(
            potency.PotencyJobConfig(features=feats["images"], out=str(out / f"potency-{tag}"), folds=args.folds)
        )
        m = fit["metrics"]
        res[f"potency_{tag}"] = {"minutes": (time.perf_counter() - t0) / 60, **m}
        print(
            f"potency from {what} of {pot_n} new-vessel images (seed 7007): R² {m['r2']:.3f}, Spearman ρ "
            f"{m['spearman']:.3f}, MAE {m['mae']:.2f} on held-out vessels ({res[f'potency_{tag}']['minutes']:.1f} min)"
        )
    print(
        f"settings: segmenter {backbone} on {n} images at {size}px (training crops {crop or 'off'}), outer folds "
        f"{args.segmenter_folds or ('all' if gpu else '0')}, "
        f"up to {args.segmenter_epochs} epochs (early stopping from epoch {min_epochs or 'half'}), "
        f"training precision {args.precision} (bf16 here: {bf16}); "
        f"potency on {pot_n} images of new vessels at {size}px read on {views or 'the artifact’s'} view(s), "
        f"{args.folds} folds by vessel"
    )
    return res


def recipe(args, gpu: bool) -> dict:
    """The classifier settings every search of this benchmark shares (one learning rate and weight decay,
    no sampling; the batch, coverage supervision, arithmetic and GPU share of the machine)."""
    import torch

    lr = 2e-3 if not gpu else 1e-3
    return dict(
        samples=1,
        lr_min=lr,
        lr_max=lr,
        wd_min=1e-5,
        wd_max=1e-5,
        batch_size=32 if not gpu else 64,
        coverage=args.coverage,
        coverage_weight=args.coverage_weight,
        average_epochs=args.average_epochs,
        precision=args.precision,
        gpus_per_trial=0.5 if gpu and torch.cuda.is_available() else 0.0,
        verbose=0,
    )


def coverage_note(args) -> str:
    """The coverage term's weights as the searches used them: the one given, or each stack's default."""
    from msc_ray import tune as mt

    if args.coverage_weight is not None:
        return f"weight {args.coverage_weight:g}"
    sstack, mstack = (mt.STACK_DEFAULTS[s].coverage_weight for s in ("sstack", "mstack"))
    return f"weight {sstack:g} single-stack, {mstack:g} multi-stack"


def inner_fold(args, stack: str, backbones: tuple[str, ...]) -> str:
    """What the fold after each outer fold does in this stack's search (TuneJobConfig.inner_fold)."""
    if stack != "mstack":
        return "validate"
    if args.mstack_inner_fold == "auto":
        return "train" if len(backbones) == 1 else "validate"
    return args.mstack_inner_fold


def init_model(out: Path, args, size: int, input_size: int, backbones: tuple[str, ...], gpu: bool) -> str:
    """A single-stack model at the multi-stack input side, trained on a corpus of its own (seed 8: none of
    its vessels is in the multi-stack corpus, seed 7, or the new vessels, seed 7007), for the multi-stack
    search to start from (``--pretrained`` with an artifact: its weights but the head's). A short
    ``msc-ray tune`` run on three folds; only its exported model is used."""

    from msc_ray import corpus, synth
    from msc_ray import tune as mt

    t0 = time.perf_counter()
    root = out / "init-corpus-sstack"
    synth.synthesize(root, synth.SynthConfig(n=args.init_n, size=size, stack="sstack", seed=8, workers=WORKERS))
    table, _ = corpus.index_corpus(str(root), folds=3, seed=0)
    job = mt.TuneJobConfig(
        manifest=corpus.write_manifest(table, str(root / "manifest.parquet")),
        out=str(out / "run-init-sstack"),
        stack="sstack",
        backbones=backbones,
        max_epochs=args.init_epochs,
        patience=args.init_epochs,
        size=input_size,
        views=1,
        pretrained="none",
        asha=False,
        **recipe(args, gpu),
    )
    outcome = mt.run_search(job)
    row = outcome.table[-1]  # the winner on every fold
    print(
        f"\n== multi-stack start: single-stack {outcome.winner['backbone']} at {input_size}px on {args.init_n} images "
        f"(seed 8), {args.init_epochs} epochs, {(time.perf_counter() - t0) / 60:.1f} min; its outer folds: "
        f"accuracy {row['acc_mean']:.3f}"
    )
    return outcome.outputs["artifact"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true", help="the study's scale: 1000 images per stack, 224 px, GPUs")
    ap.add_argument("--n", type=int, default=None, help="single-stack classifier corpus (CPU 1600, GPU 1000 images)")
    ap.add_argument(
        "--mstack-n",
        type=int,
        default=None,
        help="multi-stack classifier corpus (CPU 450, GPU 1000). On CPUs its fold models train on four of five "
        "folds (--mstack-inner-fold), 360 images each, for what 500 images with an inner validation fold cost",
    )
    ap.add_argument("--detector-n", type=int, default=None, help="detector corpus, single-stack (CPU 300, GPU 1000)")
    ap.add_argument("--size", type=int, default=None, help="stored image side (CPU 128, GPU 512)")
    ap.add_argument("--input-size", type=int, default=None, help="single-stack classifier input (CPU 64, GPU 224)")
    ap.add_argument(
        "--mstack-input-size",
        type=int,
        default=None,
        help="multi-stack classifier input (CPU 128, GPU 224): its thin, low-contrast cells vanish at 64 px",
    )
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument(
        "--max-epochs",
        type=int,
        default=25,
        help="single-stack classifier epochs (msc-ray tune's single-stack default; 30 read two development folds "
        "0.5 point better for a fifth more time, which the whole multi-stack schedule needs)",
    )
    ap.add_argument("--patience", type=int, default=6, help="single-stack early-stopping patience")
    ap.add_argument(
        "--mstack-max-epochs",
        type=int,
        default=60,
        help="multi-stack classifier epochs. Its faint cell edges learn slowly; with bfloat16 on this machine's "
        "CPUs 60 epochs cost what 30 did in float32 (11-13 min) and gave new vessels 0.895 against 0.880 (Table 1 "
        "0.832 both)",
    )
    ap.add_argument(
        "--mstack-patience",
        type=int,
        default=0,
        help="multi-stack early-stopping patience; 0 (default): the stack's, i.e. each trial runs its whole "
        "schedule and keeps its best inner-validation epoch (patience 6 stopped fold trials at 36-48 of 60 with "
        "the learning rate still high: on eight fold models of development corpora the whole schedule read new "
        "vessels 2.2 points better on average)",
    )
    ap.add_argument(
        "--mstack-inner-fold",
        choices=("auto", "validate", "train"),
        default="auto",
        help="multi-stack: train (msc-ray tune --inner-fold train): the inner fold trains too, each fold's model "
        "runs its whole schedule on four of five folds and each outer fold's temperature is fitted on the other "
        "folds' outer outputs; validate: three of five folds train, the inner fold picks the best epoch and the "
        "temperature; auto (default): train where the multi-stack search has one configuration (the CPU "
        "default), validate where it chooses between backbones (--gpu)",
    )
    ap.add_argument(
        "--mstack-init",
        choices=("sstack", "none"),
        default="none",
        help="sstack: the multi-stack search starts from a single-stack model (msc-ray tune --pretrained ARTIFACT) "
        "trained at the multi-stack input side on a corpus of its own (seed 8: no vessel of the multi-stack "
        "corpus or the new vessels); none (default): random weights. On development corpora the start gained "
        "2-5 points after 30 epochs but 0.5-1.3 after 60, for about 5 more minutes than the 30 min allow (README)",
    )
    ap.add_argument("--init-n", type=int, default=800, help="images of the single-stack corpus that --mstack-init uses")
    ap.add_argument("--init-epochs", type=int, default=15, help="epochs of that single-stack model")
    ap.add_argument("--stacks", default="sstack,mstack", help="classifier stacks (comma-separated)")
    ap.add_argument(
        "--coverage",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="coverage supervision from the corpus's cell masks while the compact CNN trains",
    )
    ap.add_argument(
        "--coverage-weight",
        type=float,
        default=None,
        help="weight of the coverage term (default: the stack's, msc-ray tune's: 3 single-stack, 16 multi-stack)",
    )
    ap.add_argument(
        "--average-epochs",
        type=float,
        default=2.0,
        help="classifiers judge and export a moving average of their weights over this many epochs of steps "
        "(msc-ray tune --average-epochs; 0: the last step's weights)",
    )
    ap.add_argument(
        "--precision", default="auto", help="training arithmetic of every model: auto, bf16 or fp32 (msc-ray tune)"
    )
    ap.add_argument(
        "--backbones", default=None, help="single-stack: CPU coverage_unet; GPU inception_v3,resnet50,vit_b_16"
    )
    ap.add_argument(
        "--mstack-backbones", default=None, help="multi-stack: CPU compact_cnn; GPU inception_v3,resnet50,vit_b_16"
    )
    ap.add_argument("--detector-epochs", type=int, default=24)
    ap.add_argument("--detector-folds", default=None, help="outer folds of Table 2 (CPU 0,1; GPU all)")
    ap.add_argument("--heldout-n", type=int, default=200, help="held-out images per stack (new vessels)")
    ap.add_argument("--out", default=None, help="keep the runs here (default: a temporary folder)")
    ap.add_argument("--stages", default="classifier,detector", help="classifier, detector, segmenter (comma-separated)")
    ap.add_argument("--seg-n", type=int, default=None, help="segmenter corpus images (CPU 600, GPU 1000)")
    ap.add_argument(
        "--segmenter-backbone",
        default=None,
        help="unet (CPU default), unet_wide (GPU default), or Mask R-CNN: compact_fpn (CPUs), resnet50_fpn (GPUs)",
    )
    ap.add_argument("--seg-size", type=int, default=None, help="segmenter and potency image side (256)")
    ap.add_argument("--seg-crop", type=int, default=None, help="segmenter training crop side (CPU 128; GPU 0: whole)")
    ap.add_argument(
        "--potency-views", type=int, default=None, help="views the potency corpus is segmented on (CPU 1; GPU 0: 8)"
    )
    # 60 (was 40 before the U-Net trained channels-last, in about the same minutes): chosen on new vessels
    # of another seed (scripts/segmenter_limits.py, seed 1234), not on this benchmark's outer fold
    ap.add_argument("--segmenter-epochs", type=int, default=60, help="segmenter epochs (patience may stop sooner)")
    ap.add_argument(
        "--segmenter-min-epochs", type=int, default=None, help="epochs before early stopping (CPU 45; GPU half)"
    )
    ap.add_argument("--segmenter-folds", default=None, help="outer folds of the segmentation table (CPU 0; GPU all)")
    ap.add_argument("--potency-n", type=int, default=None, help="new-vessel images for potency (CPU 1800, GPU 2000)")
    args = ap.parse_args()
    stages = set(args.stages.split(","))
    bad = sorted(set(args.stacks.split(",")) - {"sstack", "mstack"})
    if bad:
        ap.error(f"--stacks {args.stacks}: unknown stack {', '.join(bad)} (sstack, mstack)")
    gpu = args.gpu
    n = {
        "sstack": args.n or (1000 if gpu else 1600),  # CPU: the most that keeps the whole run within 30 min
        "mstack": args.mstack_n or (1000 if gpu else 450),
        "detector": args.detector_n or (1000 if gpu else 300),
    }
    size = args.size or (512 if gpu else 128)
    input_size = {
        "sstack": args.input_size or (224 if gpu else 64),
        "mstack": args.mstack_input_size or (224 if gpu else 128),
    }
    study = "inception_v3,resnet50,vit_b_16"
    backbones = {
        "sstack": tuple((args.backbones or (study if gpu else "coverage_unet")).split(",")),
        "mstack": tuple((args.mstack_backbones or (study if gpu else "compact_cnn")).split(",")),
    }

    import ray

    from msc_ray import corpus, synth
    from msc_ray import tune as mt

    t_all = time.perf_counter()
    out = Path(args.out or tempfile.mkdtemp())
    ray.init(include_dashboard=False, log_to_driver=False, **({} if gpu else {"num_cpus": 2}))
    report: dict = {}
    if "segmenter" in stages:
        report["segmenter"] = segmenter_stage(out, args, gpu)
    if stages & {"classifier", "detector"}:
        synth.synthesize(out / "heldout", synth.SynthConfig(n=args.heldout_n, size=size, seed=7007, workers=WORKERS))
    manifests: dict[tuple[str, int], str] = {}

    def manifest_for(stack: str, images: int) -> str:
        """One corpus per (stack, size of corpus), seed 7, indexed into folds grouped by vessel."""
        if (stack, images) not in manifests:
            root = out / f"corpus-{stack}-{images}"
            synth.synthesize(root, synth.SynthConfig(n=images, size=size, stack=stack, seed=7, workers=WORKERS))
            table, _ = corpus.index_corpus(str(root), folds=args.folds, seed=0)
            manifests[stack, images] = corpus.write_manifest(table, str(root / "manifest.parquet"))
        return manifests[stack, images]

    for stack in args.stacks.split(",") if "classifier" in stages else ():
        t0 = time.perf_counter()
        init = "none"
        if stack == "mstack" and args.mstack_init == "sstack":
            init = init_model(out, args, size, input_size["mstack"], backbones["mstack"], gpu)
        job = mt.TuneJobConfig(
            manifest=manifest_for(stack, n[stack]),
            out=str(out / f"run-{stack}"),
            stack=stack,
            backbones=backbones[stack],
            max_epochs=args.mstack_max_epochs if stack == "mstack" else args.max_epochs,
            patience=args.mstack_patience if stack == "mstack" else args.patience,
            size=input_size[stack],
            pretrained=init,
            asha=len(backbones[stack]) > 1,
            inner_fold=inner_fold(args, stack, backbones[stack]),
            **recipe(args, gpu),
        )
        outcome = mt.run_search(job)
        held = heldout_classifier(outcome.outputs["artifact"], out / "heldout", stack)
        report[stack] = {
            "minutes": (time.perf_counter() - t0) / 60,
            "table": outcome.table,
            "winner": outcome.winner,
            "heldout": held,
        }
        print(f"\n== Table 1, {stack} ({report[stack]['minutes']:.1f} min)")
        print(Path(outcome.outputs["table_md"]).read_text())
        print(
            f"exported model on {held['images']} held-out images (new vessels, seed 7007): accuracy "
            f"{held['accuracy']:.3f}, ECE {held['ece']:.3f} (floor {held['ece_floor']:.3f}), "
            f"confluence MAE {held['confluence_mae']:.1f} points"
        )
    if "detector" in stages:
        report["detector"] = detector_stage(manifest_for("sstack", n["detector"]), out, args, gpu, size)
    if stages & {"classifier", "detector"}:
        bf16 = bf16_here(args.precision, gpu)
        mstack_inner = inner_fold(args, "mstack", backbones["mstack"])
        mstack_stop = (
            "the whole schedule on four of five folds, last weights kept, temperatures cross-fitted"
            if mstack_inner == "train"
            else f"patience {args.mstack_patience}"
            if args.mstack_patience
            else "the whole schedule, best epoch kept"
        )
        inner_note = "" if mstack_inner == "validate" else " single-stack, training multi-stack"
        print(
            f"settings: {n['sstack']} single-stack, {n['mstack']} multi-stack and {n['detector']} detector "
            f"images at {size}px (classifier input {input_size['sstack']}px single-stack, "
            f"{input_size['mstack']}px multi-stack), {args.folds} folds grouped by vessel (outer test, next fold "
            f"inner validation{inner_note}), backbones {','.join(backbones['sstack'])} single-stack, "
            f"{','.join(backbones['mstack'])} multi-stack, up to {args.max_epochs} epochs (patience "
            f"{args.patience}; multi-stack {args.mstack_max_epochs}, {mstack_stop}, starting "
            f"from {'a single-stack model' if args.mstack_init == 'sstack' else 'random weights'}), "
            f"coverage supervision {coverage_note(args) if args.coverage else 'off'}, "
            f"weights judged {f'averaged, {args.average_epochs:g} epochs' if args.average_epochs else 'last step'}, "
            f"training precision {args.precision} (bf16 here: {bf16}), "
            f"detector up to {args.detector_epochs} epochs, random init, "
            f"{'GPU' if gpu else '2 CPU cores'}"
        )
    print(f"stages {','.join(sorted(stages))}; total {(time.perf_counter() - t_all) / 60:.1f} min")
    (out / "quality.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"runs and quality.json under {out}")


def detector_stage(manifest: str, out: Path, args, gpu: bool, size: int) -> dict:
    """Table 2: the abnormal-cell detector on outer folds."""
    from msc_ray import detect

    t0 = time.perf_counter()
    det = detect.train_detector(
        detect.DetectJobConfig(
            manifest=manifest,
            out=str(out / "detector"),
            folds=tuple(int(f) for f in (args.detector_folds or ("" if gpu else "0,1")).split(",") if f),
            epochs=args.detector_epochs,
            patience=6,
            workers=2 if not gpu else 1,
            gpu=gpu,
            cpus_per_worker=1.0,
            backbone="resnet50_fpn" if gpu else "compact_fpn",
            size=size if gpu else 128,
            batch_size=4,
            precision=args.precision,
        )
    )
    res = {
        "minutes": (time.perf_counter() - t0) / 60,
        "summary": det["summary"],
        "operating_point": det["operating_point"],
        "folds": det["folds"],
    }
    print(f"\n== Table 2, abnormal cells ({res['minutes']:.1f} min)")
    print(Path(det["table_md"]).read_text())
    return res


if __name__ == "__main__":
    main()
