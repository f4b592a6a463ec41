"""Cell morphology from instance masks (scikit-image ``regionprops``): one row per cell, one per image.

Inputs are instance masks — integer arrays, 0 the background, each cell its own id — of the cells and,
optionally, of their nuclei (the synthetic corpus's truth, or a segmenter's output). Per cell:

==================  =============================================================================
area                pixels of the cell
perimeter           ``regionprops`` perimeter (pixels)
major_axis / minor  lengths of the axes of the ellipse with the same second moments
aspect_ratio        major / minor (NaN for a one-pixel-wide cell)
eccentricity        of that ellipse, 0 (a disc) to 1 (a line)
solidity            area / convex-hull area (1 for a convex cell)
orientation         angle of the major axis to the image rows, radians in (-π/2, π/2]
circularity         4π·area / perimeter²
nucleus_area        nucleus pixels inside the cell (NaN without a nucleus mask)
nucleus_ratio       nucleus_area / area
nucleus_aspect      major / minor axis of the nucleus pixels in the cell (NaN without): a nucleus takes
                    the shape of its spindle, and nuclei segment far better than whole cells do
touches_border      the cell is cut by the image edge (its shape is partial)
flattened           enlarged and not spindle-shaped: area ≥ ``FLAT_AREA`` × the image's median cell
                    area and aspect_ratio ≤ ``FLAT_ASPECT`` (the abnormal morphology of the study)
==================  =============================================================================

Per image: cell count, density (cells per 10⁴ px²), confluence from the masks (covered fraction, %),
median and IQR of area, aspect ratio, eccentricity, solidity, circularity, nucleus area, nucleus ratio
and nucleus aspect ratio (cells cut by the border left out of the shape statistics when any whole cell
remains), the share of flattened cells, and the alignment of the cells (mean resultant length of the
doubled orientation angles, 0 random to 1 all parallel). An image without cells gives a row with
count 0, confluence 0 and NaN shapes.
"""

from __future__ import annotations

import numpy as np

FLAT_AREA = 2.0
FLAT_ASPECT = 2.0
SHAPES = (
    "area",
    "aspect_ratio",
    "eccentricity",
    "solidity",
    "circularity",
    "nucleus_area",
    "nucleus_ratio",
    "nucleus_aspect",
)

CELL_COLUMNS = (
    "cell_id",
    "area",
    "perimeter",
    "major_axis",
    "minor_axis",
    "aspect_ratio",
    "eccentricity",
    "solidity",
    "orientation",
    "circularity",
    "nucleus_area",
    "nucleus_ratio",
    "nucleus_aspect",
    "centroid_y",
    "centroid_x",
    "touches_border",
    "flattened",
)
# the per-image summary (:func:`image_features`), in order: what the potency model learns from
IMAGE_COLUMNS = (
    "cell_count",
    "density",
    "confluence_pct",
    "flattened_share",
    *(f"{name}_{stat}" for name in SHAPES for stat in ("median", "iqr")),
    "alignment",
)


def _check(mask: np.ndarray, what: str) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"{what}: an instance mask is 2-D, got shape {mask.shape}")
    if not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(f"{what}: an instance mask holds integer ids, got {mask.dtype}")
    if mask.size and mask.min() < 0:
        raise ValueError(f"{what}: negative ids")
    return mask


def cell_features(cells: np.ndarray, nuclei: np.ndarray | None = None) -> list[dict]:
    """One dict per cell id in ``cells`` (columns :data:`CELL_COLUMNS`), in id order."""
    from skimage.measure import regionprops

    cells = _check(cells, "cell mask")
    if nuclei is not None:
        nuclei = _check(nuclei, "nucleus mask")
        if nuclei.shape != cells.shape:
            raise ValueError(f"nucleus mask {nuclei.shape} and cell mask {cells.shape} differ in shape")
    h, w = cells.shape
    # the nucleus pixels inside each cell (whatever ids the nucleus mask uses): their area and axes, per cell id
    nuc_props = (
        {}
        if nuclei is None
        else {
            int(n.label): (float(n.area), float(n.axis_major_length), float(n.axis_minor_length))
            for n in regionprops(np.where(nuclei > 0, cells, 0))
        }
    )
    none = (float("nan"),) * 3 if nuclei is None else (0.0, float("nan"), float("nan"))
    rows = []
    for r in regionprops(cells):
        minr, minc, maxr, maxc = r.bbox
        major, minor = float(r.axis_major_length), float(r.axis_minor_length)
        perim = float(r.perimeter)
        nuc, n_major, n_minor = nuc_props.get(int(r.label), none)
        rows.append(
            {
                "cell_id": int(r.label),
                "area": float(r.area),
                "perimeter": perim,
                "major_axis": major,
                "minor_axis": minor,
                "aspect_ratio": major / minor if minor > 0 else float("nan"),
                "eccentricity": float(r.eccentricity),
                "solidity": float(r.solidity),
                "orientation": float(r.orientation),
                "circularity": float(4 * np.pi * r.area / perim**2) if perim > 0 else float("nan"),
                "nucleus_area": nuc,
                "nucleus_ratio": nuc / float(r.area),
                "nucleus_aspect": n_major / n_minor if n_minor > 0 else float("nan"),
                "centroid_y": float(r.centroid[0]),
                "centroid_x": float(r.centroid[1]),
                "touches_border": bool(minr == 0 or minc == 0 or maxr == h or maxc == w),
            }
        )
    if rows:
        med = float(np.median([c["area"] for c in rows]))
        for c in rows:
            c["flattened"] = bool(c["area"] >= FLAT_AREA * med and not c["aspect_ratio"] > FLAT_ASPECT)
    return rows


def image_features(cells: list[dict], shape: tuple[int, int], covered: int | None = None) -> dict:
    """Per-image summary of :func:`cell_features` rows; ``covered`` = pixels under any cell (default:
    the sum of the cells' areas)."""
    h, w = shape
    n = len(cells)
    area_px = float(h * w)
    covered = sum(c["area"] for c in cells) if covered is None else covered
    out: dict = {
        "cell_count": n,
        "density": 1e4 * n / area_px if area_px else float("nan"),
        "confluence_pct": 100.0 * covered / area_px if area_px else float("nan"),
        "flattened_share": float(np.mean([c["flattened"] for c in cells])) if n else float("nan"),
    }
    whole = [c for c in cells if not c["touches_border"]] or cells
    for name in SHAPES:
        v = np.array([c[name] for c in whole], np.float64)
        v = v[np.isfinite(v)]
        if len(v):
            q1, med, q3 = np.percentile(v, [25, 50, 75])
            out[f"{name}_median"], out[f"{name}_iqr"] = float(med), float(q3 - q1)
        else:
            out[f"{name}_median"] = out[f"{name}_iqr"] = float("nan")
    if n:
        theta = 2 * np.array([c["orientation"] for c in cells])  # axial data: θ and θ+π are one direction
        out["alignment"] = float(np.hypot(np.cos(theta).mean(), np.sin(theta).mean()))
    else:
        out["alignment"] = float("nan")
    return out


def features(cells: np.ndarray, nuclei: np.ndarray | None = None) -> tuple[list[dict], dict]:
    """Instance masks of one image → (per-cell rows, per-image row)."""
    rows = cell_features(cells, nuclei)
    return rows, image_features(rows, cells.shape, int(np.count_nonzero(cells)))


# --------------------------------------------------------------------------------------------------
# A corpus's masks → Parquet (Ray tasks)
# --------------------------------------------------------------------------------------------------


def _measure_chunk(items: list[tuple[str, str, str, str | None]], endpoint_url: str | None) -> tuple[list, list]:
    """Ray task: ``(stack, stem, cell-mask URI, nucleus-mask URI or None)`` → (cell rows, image rows).
    A mask that cannot be read is an image row with ``error`` set, never a failed task."""
    import io

    from PIL import Image

    from .storage import read_bytes

    def load(uri: str) -> np.ndarray:
        with Image.open(io.BytesIO(read_bytes(uri, endpoint_url))) as im:
            arr = np.asarray(im)
        return _check(arr.astype(np.int64) if arr.dtype.kind in "iu" else arr, uri)

    cells_out, images_out = [], []
    for stack, stem, cell_uri, nuc_uri in items:
        base = {"stack": stack, "stem": stem, "mask": cell_uri}
        try:
            cells = load(cell_uri)
            nuclei = load(nuc_uri) if nuc_uri else None
            rows, img = features(cells, nuclei)
        except Exception as exc:
            images_out.append({**base, "error": f"{cell_uri}: {' '.join(str(exc).split())[:200]}"})
            continue
        cells_out += [{**base, **r} for r in rows]
        images_out.append({**base, **img, "error": None})
    return cells_out, images_out


def _segment_chunk(
    items: list[tuple[str, str, str, str]], segmenter: str, endpoint_url: str | None, views: int = 0
) -> tuple[list, list]:
    """Ray task: ``(stack, stem, image URI, path)`` → (cell rows, image rows) measured on the instance
    maps a segmenter predicts (loaded once per task). An unreadable image is an image row with
    ``error`` set."""
    from .data import read_uri
    from .images import ImageError, decode
    from .inference import Segmenter

    seg = Segmenter(segmenter, endpoint_url, views=views)
    cells_out, images_out = [], []
    for stack, stem, uri, path in items:
        base = {"stack": stack, "stem": stem, "mask": f"predicted by {seg.version or segmenter}"}
        try:
            cells, nuclei = seg.label_maps(decode(read_uri(uri, endpoint_url), path))
            rows, img = features(cells.astype(np.int64), nuclei.astype(np.int64))
        except (ImageError, OSError, ValueError) as exc:
            images_out.append({**base, "error": f"{path}: {' '.join(str(exc).split())[:200]}"})
            continue
        cells_out += [{**base, **r} for r in rows]
        images_out.append({**base, **img, "error": None})
    return cells_out, images_out


def _metadata(corpus: str, endpoint_url: str | None) -> dict[tuple[str, str], dict]:
    """metadata.csv rows (:func:`msc_ray.corpus.read_metadata`) by (stack, image stem)."""
    from pathlib import PurePosixPath

    from . import storage
    from .corpus import read_metadata

    uri = storage.join(corpus, "metadata.csv")
    if not storage.exists(uri, endpoint_url):
        return {}
    out = {}
    for image, row in read_metadata(storage.read_bytes(uri, endpoint_url)).items():
        p = PurePosixPath(image)
        if len(p.parts) >= 2:
            out[(p.parts[0], p.stem)] = {k: v for k, v in row.items() if k != "image"}
    return out


def measure_corpus(
    corpus: str,
    out: str,
    endpoint_url: str | None = None,
    chunk: int = 64,
    segmenter: str | None = None,
    views: int = 0,
) -> dict:
    """Every instance mask of ``corpus`` (``masks/<stack>/<stem>.png``; nuclei, when present, in
    ``masks/<stack>/nuclei/<stem>.png``) → ``OUT/cells.parquet`` and ``OUT/images.parquet`` (with the
    image's metadata.csv columns). With ``segmenter`` (an artifact), every image of the corpus is
    segmented instead and its predicted masks are measured (images need no masks), on ``views``
    test-time views (0: the artifact's own). Returns
    ``n_images``, ``n_cells``, ``errors`` and the two tables' URIs (``images``, ``cells``)."""
    import pyarrow.fs as pafs
    import ray

    from . import storage

    if segmenter is not None:
        from .corpus import index_corpus

        table, _ = index_corpus(corpus, folds=2, seed=0, endpoint_url=endpoint_url)
        rows = table.select(["stack", "path", "uri"]).to_pylist()
        items = [(r["stack"], r["path"].rsplit("/", 1)[-1].rsplit(".", 1)[0], r["uri"], r["path"]) for r in rows]
        task = ray.remote(num_cpus=1)(_segment_chunk)
        parts = ray.get(
            [task.remote(items[i : i + chunk], segmenter, endpoint_url, views) for i in range(0, len(items), chunk)]
        )
        return _write_tables(corpus, out, parts, endpoint_url)
    loc = storage.resolve(storage.join(corpus, "masks"), endpoint_url)
    found = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True, allow_not_found=True))
    rel = sorted(f.path[len(loc.path) :].lstrip("/") for f in found if f.type == pafs.FileType.File)
    masks = [r for r in rel if r.lower().endswith(".png") and len(r.split("/")) == 2]
    if not masks:
        raise ValueError(f"{corpus}: no instance masks (masks/<stack>/<image stem>.png)")
    nuclei = {r for r in rel if len(r.split("/")) == 3 and r.split("/")[1] == "nuclei"}
    items = []
    for r in masks:
        stack, name = r.split("/")
        nuc = f"{stack}/nuclei/{name}"
        items.append(
            (
                stack,
                name.rsplit(".", 1)[0],
                storage.join(corpus, "masks", r),
                storage.join(corpus, "masks", nuc) if nuc in nuclei else None,
            )
        )
    task = ray.remote(num_cpus=1)(_measure_chunk)
    parts = ray.get([task.remote(items[i : i + chunk], endpoint_url) for i in range(0, len(items), chunk)])
    return _write_tables(corpus, out, parts, endpoint_url)


def _write_tables(corpus: str, out: str, parts: list, endpoint_url: str | None) -> dict:
    """The tasks' (cell rows, image rows) → ``OUT/cells.parquet`` and ``OUT/images.parquet``, the
    image rows joined with the corpus's metadata.csv."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from . import storage

    cells = [c for p in parts for c in p[0]]
    imgs = [m for p in parts for m in p[1]]
    meta = _metadata(corpus, endpoint_url)
    for m in imgs:
        for k, v in meta.get((m["stack"], m["stem"]), {}).items():
            m.setdefault(k, _number(v))
    tables = {"cells": pa.Table.from_pylist(cells), "images": pa.Table.from_pylist(imgs)}
    paths = {}
    for name, t in tables.items():
        paths[name] = storage.join(out, f"{name}.parquet")
        buf = pa.BufferOutputStream()
        pq.write_table(t, buf)
        storage.write_bytes(paths[name], buf.getvalue().to_pybytes(), endpoint_url)
    return {"n_images": len(imgs), "n_cells": len(cells), "errors": sum(1 for m in imgs if m.get("error")), **paths}


def _number(v: str):
    """A metadata.csv cell as int or float where it is one, else the text."""
    for kind in (int, float):
        try:
            return kind(v)
        except (TypeError, ValueError):
            pass
    return v
