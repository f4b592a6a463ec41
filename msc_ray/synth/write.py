"""Writing a corpus: images, Pascal VOC annotations, masks, ``metadata.csv`` and ``truth.parquet``."""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from xml.etree import ElementTree as ET

import numpy as np
from PIL import Image

from .. import ABNORMAL_LABEL, BAND_NAMES
from .plan import ImageSpec, SynthConfig, band_of, plan_corpus
from .render import render

log = logging.getLogger(__name__)


def _voc_xml(filename: str, size: int, boxes: list[tuple[int, int, int, int]]) -> bytes:
    root = ET.Element("annotation")
    ET.SubElement(root, "filename").text = filename
    sz = ET.SubElement(root, "size")
    for tag, val in (("width", size), ("height", size), ("depth", 1)):
        ET.SubElement(sz, tag).text = str(val)
    for x1, y1, x2, y2 in boxes:
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = ABNORMAL_LABEL
        ET.SubElement(obj, "difficult").text = "0"
        bb = ET.SubElement(obj, "bndbox")
        # VOC: 1-based inclusive pixel indices
        for tag, val in (("xmin", x1 + 1), ("ymin", y1 + 1), ("xmax", x2), ("ymax", y2)):
            ET.SubElement(bb, tag).text = str(val)
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def _write_image(path: Path, img: np.ndarray, fmt: str) -> None:
    if fmt == "png":
        Image.fromarray(np.round(img * 255).astype(np.uint8)).save(path, compress_level=1)
    elif fmt == "jpg":
        Image.fromarray(np.round(img * 255).astype(np.uint8)).save(path, quality=92)
    else:  # 16-bit TIFF, as microscope cameras write
        import tifffile

        tifffile.imwrite(path, np.round(img * 65535).astype(np.uint16), photometric="minisblack")


def _make_one(args: tuple[ImageSpec, SynthConfig, str]) -> dict:
    spec, cfg, out = args
    root = Path(out)
    img, mask, truth = render(spec, cfg.size)
    cls = band_of(truth["confluence"])
    rel = f"{spec.stack}/{BAND_NAMES[cls - 1]}/{spec.stem}.{cfg.fmt}"
    _write_image(root / rel, img, cfg.fmt)
    mask_rel = f"masks/{spec.stack}/{spec.stem}.png"
    Image.fromarray(mask).save(root / mask_rel, compress_level=1)  # uint16 → 16-bit PNG
    Image.fromarray(truth["nuclei"]).save(root / f"masks/{spec.stack}/nuclei/{spec.stem}.png", compress_level=1)
    if spec.stack == "sstack":
        xml = _voc_xml(Path(rel).name, cfg.size, truth["boxes"])
        (root / spec.stack / "annotations" / f"{spec.stem}.xml").write_bytes(xml)
    return {
        "image": rel,
        "stack": spec.stack,
        "class": cls,
        "label": BAND_NAMES[cls - 1],
        "confluence": truth["confluence"],
        "target_confluence": spec.target,
        "cell_count": truth["cell_count"],
        "n_abnormal": len(truth["boxes"]),
        "boxes": [list(b) for b in truth["boxes"]],
        "abnormal_ids": truth["abnormal_ids"],
        "vessel": spec.vessel,
        "day": spec.day,
        "position": spec.position,
        "mask": mask_rel,
        "nucleus_mask": f"masks/{spec.stack}/nuclei/{spec.stem}.png",
        "elongation": spec.biology.elongation,
        "cell_size": spec.biology.size,
        "nucleus_factor": spec.biology.nucleus,
        "flattening": spec.biology.flattening,
        "potency": spec.potency,
        "width": cfg.size,
        "height": cfg.size,
    }


def _prepare_out(out: Path, cfg: SynthConfig) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        for stack in cfg.stacks:
            for name in BAND_NAMES:
                (out / stack / name).mkdir(parents=True, exist_ok=True)
            (out / "masks" / stack / "nuclei").mkdir(parents=True, exist_ok=True)
            if stack == "sstack":
                (out / stack / "annotations").mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ValueError(f"output folder {out} is not writable: {exc.strerror or exc}") from None


def synthesize(
    out: str | os.PathLike, cfg: SynthConfig, progress: Callable[[Iterator], Iterator] | None = None
) -> list[dict]:
    """Write a synthetic corpus to ``out`` (a local folder) and return the truth rows.

    ``progress`` wraps the iterator of finished images (e.g. a progress bar)."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    cfg.validate()
    root = Path(out)
    _prepare_out(root, cfg)
    specs = plan_corpus(cfg)
    jobs = [(s, cfg, str(root)) for s in specs]
    if cfg.workers > 1:
        with ProcessPoolExecutor(max_workers=cfg.workers) as pool:
            it = pool.map(_make_one, jobs, chunksize=4)
            rows = list(progress(it) if progress else it)
    else:
        it = map(_make_one, jobs)
        rows = list(progress(it) if progress else it)

    _write_metadata(root / "metadata.csv", rows)
    table = pa.Table.from_pylist(rows, schema=_truth_schema())
    pq.write_table(table, root / "truth.parquet")
    (root / "synth_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    log.info("wrote %d images to %s", len(rows), root)
    return rows


def _write_metadata(path: Path, rows: list[dict]) -> None:
    """``metadata.csv``: per image the measured covered fraction, as an instrument's confluence export
    gives it, and the vessel-day's potency assay."""
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "vessel", "day", "position", "confluence", "potency"])
        for r in rows:
            w.writerow(
                [r["image"], r["vessel"], r["day"], r["position"], f"{r['confluence']:.4f}", f"{r['potency']:.3f}"]
            )


def _truth_schema():
    """The Arrow schema of ``truth.parquet``."""
    import pyarrow as pa

    return pa.schema(
        [
            ("image", pa.string()),
            ("stack", pa.string()),
            ("class", pa.int8()),
            ("label", pa.string()),
            ("confluence", pa.float64()),
            ("target_confluence", pa.float64()),
            ("cell_count", pa.int32()),
            ("n_abnormal", pa.int8()),
            ("boxes", pa.list_(pa.list_(pa.int32(), 4))),
            ("abnormal_ids", pa.list_(pa.int32())),
            ("vessel", pa.string()),
            ("day", pa.int16()),
            ("position", pa.string()),
            ("mask", pa.string()),
            ("nucleus_mask", pa.string()),
            ("elongation", pa.float64()),
            ("cell_size", pa.float64()),
            ("nucleus_factor", pa.float64()),
            ("flattening", pa.float64()),
            ("potency", pa.float64()),
            ("width", pa.int32()),
            ("height", pa.int32()),
        ]
    )
