"""Summaries and plots of a scoring report: counts per band, stack and status; the band
distribution; per-vessel confluence over time when object keys carry vessel and day; with a
segmenter, the morphology distributions (per image and per cell); with a potency model, the
predicted potency per vessel over days."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa

from . import score, storage

log = logging.getLogger(__name__)


def summarise(table: pa.Table, potency: pa.Table | None = None) -> dict:
    rows = table.select(["status", "stack", "band", "predicted_class", "n_abnormal", "cell_count"]).to_pylist()
    ok = [r for r in rows if r["status"] == "ok"]
    counts = [r["cell_count"] for r in ok if r["cell_count"] is not None]
    out = {
        "rows": len(rows),
        "status": dict(Counter(r["status"] for r in rows)),
        "stack": dict(Counter(r["stack"] for r in rows)),
        "band": dict(Counter(r["band"] or r["predicted_class"] for r in ok)),
        "images_with_abnormal_cells": sum(1 for r in ok if (r["n_abnormal"] or 0) > 0),
        "segmented_images": len(counts),
        "cells": int(sum(counts)),
    }
    if potency is not None and potency.num_rows:
        p = potency.column("potency").to_numpy()
        out["potency"] = {
            "vessel_days": potency.num_rows,
            "vessels": len(set(potency.column("vessel").to_pylist())),
            "min": float(p.min()),
            "median": float(np.median(p)),
            "max": float(p.max()),
        }
    return out


def lines(summary: dict) -> list[str]:
    out = [f"{summary['rows']} rows"]
    for what in ("status", "stack", "band"):
        out.append(f"  {what}: " + ", ".join(f"{k}={v}" for k, v in sorted(summary[what].items(), key=str)))
    out.append(f"  images with abnormal cells: {summary['images_with_abnormal_cells']}")
    if summary.get("segmented_images"):
        out.append(f"  segmented images: {summary['segmented_images']}, {summary['cells']} cells")
    if "potency" in summary:
        p = summary["potency"]
        out.append(
            f"  predicted potency: {p['vessel_days']} vessel-days of {p['vessels']} vessels, "
            f"median {p['median']:.3g} (range {p['min']:.3g} to {p['max']:.3g})"
        )
    return out


def plot(
    table: pa.Table, dest: str | Path, cells: pa.Table | None = None, potency: pa.Table | None = None
) -> dict[str, str]:
    """Write ``bands.png`` and, when keys carry vessel and day, ``vessels.png`` under ``dest``; with
    morphology in the rows, ``morphology.png``; with a potency table, ``potency.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    out: dict[str, str] = {}
    t = table.to_pydict()
    ok = [i for i, s in enumerate(t["status"]) if s == "ok"]
    out["bands"] = _bands_plot(t, ok, dest / "bands.png", plt)
    vessels = _vessels_plot(t, ok, dest / "vessels.png", plt)
    if vessels:
        out["vessels"] = vessels
    if any(t["cell_count"][i] is not None for i in ok):
        out["morphology"] = _morphology_plot(t, ok, cells, dest / "morphology.png", plt)
    if potency is not None and potency.num_rows:
        out["potency"] = _potency_plot(potency, dest / "potency.png", plt)
    return out


def _bands_plot(t: dict, ok: list[int], path: Path, plt) -> str:
    """Predicted bands per stack, with the number of error rows in the title."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    stacks = sorted({t["stack"][i] for i in ok})
    labels = sorted({t["band"][i] or t["predicted_class"][i] for i in ok}, key=str)
    width = 0.8 / max(len(stacks), 1)
    for k, s in enumerate(stacks):
        c = Counter(t["band"][i] or t["predicted_class"][i] for i in ok if t["stack"][i] == s)
        ax.bar(np.arange(len(labels)) + k * width, [c.get(lab, 0) for lab in labels], width, label=s)
    ax.set_xticks(np.arange(len(labels)) + width * (len(stacks) - 1) / 2, labels)
    n_err = len(t["status"]) - len(ok)
    ax.set(xlabel="predicted confluence band", ylabel="images", title=f"band distribution ({n_err} error rows)")
    if stacks:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def _vessels_plot(t: dict, ok: list[int], path: Path, plt) -> str | None:
    """Mean confluence per vessel over days (None when keys carry no vessel and day)."""
    series: dict[str, dict[int, list[float]]] = {}
    for i in ok:
        v, d, c = t["vessel"][i], t["day"][i], t["confluence_pct"][i]
        if v is not None and d is not None and c is not None:
            series.setdefault(v, {}).setdefault(d, []).append(c)
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for v in sorted(series):
        days = sorted(series[v])
        ax.plot(days, [np.mean(series[v][d]) for d in days], marker="o", label=v)
    for edge in (40, 60, 80):
        ax.axhline(edge, color="grey", lw=0.6, ls="--")
    ax.set(
        xlabel="day",
        ylabel="estimated confluence (%)",
        ylim=(0, 100),
        title="confluence per vessel over time (mean over positions)",
    )
    if len(series) <= 12:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def _morphology_plot(t: dict, ok: list[int], cells: pa.Table | None, path: Path, plt) -> str:
    """Distributions: per image (cell count, mask confluence, flattened share, median aspect ratio)
    and, from the per-cell table, per cell (area, aspect ratio, nucleus/cell ratio)."""
    panels = [
        ("cell_count", "cells per image"),
        ("mask_confluence_pct", "mask confluence per image (%)"),
        ("flattened_share", "share of flattened cells per image"),
        ("aspect_ratio_median", "median aspect ratio per image"),
    ]
    per_cell = [("area", "cell area (px)"), ("aspect_ratio", "cell aspect ratio"), ("nucleus_ratio", "nucleus / cell")]
    if cells is not None and cells.num_rows:
        panels += [(c, label, "cell") for c, label in per_cell]
    fig, axes = plt.subplots(2, 4, figsize=(12, 5.5))
    for ax, panel in zip(axes.flat, panels, strict=False):
        col, label = panel[0], panel[1]
        if len(panel) == 3:
            v = cells.column(col).to_numpy(zero_copy_only=False).astype(float)
        else:
            v = np.array([t[col][i] for i in ok if t[col][i] is not None], float)
        v = v[np.isfinite(v)]
        ax.hist(v, bins=30, color="tab:green" if len(panel) == 3 else "tab:blue")
        ax.set_xlabel(label, fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle("morphology of the predicted cell masks")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def _potency_plot(potency: pa.Table, path: Path, plt) -> str:
    """Predicted potency per vessel over days (one line per vessel)."""
    p = potency.to_pydict()
    series: dict[str, list[tuple[int, float]]] = {}
    for v, d, y in zip(p["vessel"], p["day"], p["potency"], strict=True):
        if d is not None:
            series.setdefault(v, []).append((d, y))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for v in sorted(series):
        days, ys = zip(*sorted(series[v]), strict=True)
        ax.plot(days, ys, marker="o", label=v)
    ax.set(xlabel="day", ylabel="predicted potency", title="predicted potency per vessel over time")
    if len(series) <= 12:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def default_plots_dir(uri: str) -> Path:
    """Where plots go by default: beside the report, never inside it (a Parquet reader of the
    report folder must read it untouched): ``REPORT-plots`` for a local report, ``./report-plots``
    for one in object storage."""
    if storage.is_s3(uri):
        return Path("report-plots")
    return Path(str(uri).rstrip("/\\") + "-plots")


def _check_exists(uri: str, endpoint_url: str | None) -> None:
    """A report location that does not exist is named as such (not "no rows")."""
    if storage.is_s3(uri):
        bucket, _ = score._split_s3(uri)
        try:
            storage.s3_client(endpoint_url).head_bucket(Bucket=bucket)
        except Exception as exc:
            raise storage.StorageError(f"{uri}: cannot read the bucket {bucket!r}: {score._s3_reason(exc)}") from None
    elif not Path(uri).exists():
        raise ValueError(f"{uri}: no such report folder")


def report(
    uri: str, plots_dir: str | Path | None = None, endpoint_url: str | None = None
) -> tuple[dict, dict[str, str]]:
    """Counts and plots of the committed rows of the report at ``uri``; plots under ``plots_dir``
    (default :func:`default_plots_dir`)."""
    table = score.read_report(uri, endpoint_url)
    if table.num_rows == 0:
        _check_exists(uri, endpoint_url)
        raise ValueError(f"{uri}: no committed rows (not a report, or nothing scored yet)")
    potency = score.read_potency(uri, endpoint_url)
    segmented = table.column("cell_count").null_count < table.num_rows
    cells = (
        score.read_cells(uri, endpoint_url, columns=["area", "aspect_ratio", "nucleus_ratio"]) if segmented else None
    )
    dest = plots_dir if plots_dir is not None else default_plots_dir(uri)
    return summarise(table, potency), plot(table, dest, cells, potency)
