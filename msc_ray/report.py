"""Summaries and plots of a scoring report: counts per band, stack and status; the band
distribution; per-vessel confluence over time when object keys carry vessel and day."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa

from . import score, storage

log = logging.getLogger(__name__)


def summarise(table: pa.Table) -> dict:
    rows = table.select(["status", "stack", "band", "predicted_class", "n_abnormal"]).to_pylist()
    ok = [r for r in rows if r["status"] == "ok"]
    return {
        "rows": len(rows),
        "status": dict(Counter(r["status"] for r in rows)),
        "stack": dict(Counter(r["stack"] for r in rows)),
        "band": dict(Counter(r["band"] or r["predicted_class"] for r in ok)),
        "images_with_abnormal_cells": sum(1 for r in ok if (r["n_abnormal"] or 0) > 0),
    }


def lines(summary: dict) -> list[str]:
    out = [f"{summary['rows']} rows"]
    for what in ("status", "stack", "band"):
        out.append(f"  {what}: " + ", ".join(f"{k}={v}" for k, v in sorted(summary[what].items(), key=str)))
    out.append(f"  images with abnormal cells: {summary['images_with_abnormal_cells']}")
    return out


def plot(table: pa.Table, dest: str | Path) -> dict[str, str]:
    """Write ``bands.png`` and, when keys carry vessel and day, ``vessels.png`` under ``dest``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    out: dict[str, str] = {}
    t = table.to_pydict()
    ok = [i for i, s in enumerate(t["status"]) if s == "ok"]
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
    fig.savefig(dest / "bands.png", dpi=110)
    plt.close(fig)
    out["bands"] = str(dest / "bands.png")

    series: dict[str, dict[int, list[float]]] = {}
    for i in ok:
        v, d, c = t["vessel"][i], t["day"][i], t["confluence_pct"][i]
        if v is not None and d is not None and c is not None:
            series.setdefault(v, {}).setdefault(d, []).append(c)
    if series:
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
        fig.savefig(dest / "vessels.png", dpi=110)
        plt.close(fig)
        out["vessels"] = str(dest / "vessels.png")
    return out


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
    return summarise(table), plot(table, plots_dir if plots_dir is not None else default_plots_dir(uri))
