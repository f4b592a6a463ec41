#!/usr/bin/env python
"""How the scoring driver's planning grows with archive size: listing, the report's committed keys,
and the commit manifests, at N and 10×N objects, as ratios against the N run in this script.

For each size: an archive of N image-named objects (empty files: listing and planning read names
and sizes, not pixels) and a report holding one committed row per object. In a fresh process each,
a first run (an empty report: every object is planned, a window at a time) and a rerun (every key is
looked up and skipped) list and plan the archive; the script prints the driver's peak resident
memory above its baseline (interpreter, pyarrow, msc_ray imported), the seconds, and the number
and bytes of commit manifests at the default chunk size.

    .venv/bin/python scripts/bench_scale.py [--n 20000] [--factor 10]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SETUP = r"""
import os, sys
import pyarrow as pa
from msc_ray import score
archive, out, n, chunk = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
os.makedirs(archive, exist_ok=True)
for i in range(n):  # vessel folders of 100 images, as a plant's archive is laid out
    d = os.path.join(archive, "sstack", f"V{i // 100:05d}")
    if i % 100 == 0:
        os.makedirs(d, exist_ok=True)
    open(os.path.join(d, f"V{i // 100:05d}_d{i % 10:02d}_p{i % 100:02d}.png"), "wb").close()
objs = score.list_archive(archive)
for c in range(0, n, chunk):  # the report of an earlier run: every object committed
    part = objs[c : c + chunk]
    rows = [{"uri": o.uri, "key": o.key, "size": o.size, "version": o.version, "stack": "sstack",
             "status": "ok", "classifier_version": "v1", "run_id": "first"} for o in part]
    table = pa.Table.from_pylist(rows, schema=score.REPORT_SCHEMA)
    score._publish(table, out, None, f"first-{c // chunk:05d}", {"run_id": "first"})
"""

MEASURE = r"""
import json, os, resource, sys, time
from msc_ray import score
archive, out, n, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
rss0 = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
report = out if mode == "rerun" else out + "-empty"
cfg = score.ScoreConfig(archive=archive, classifier="unused", out=report)
sm = score.StackModels({"sstack": ("unused", {"version": "v1", "classes": []})})
summary = score.ScoreSummary(run_id="second")
t0 = time.perf_counter()
done = score.DoneKeys.load(report)
planned = sum(len(todo) for todo, _ in score._plan_windows(cfg, sm, summary, done))
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
commits = [os.path.join(out, "_commits", f) for f in os.listdir(os.path.join(out, "_commits"))]
print(json.dumps({
    "n": n, "listed": summary.listed, "to_score": planned, "skipped": summary.skipped,
    "plan_seconds": seconds, "driver_bytes": max(peak - rss0, 0), "baseline_bytes": rss0,
    "manifests": len(commits), "manifest_bytes": sum(os.path.getsize(c) for c in commits),
}))
"""


def run(n: int, chunk: int) -> dict[str, dict]:
    """Both plans over one archive of ``n`` objects: a first run (nothing in the report: every object
    planned, a window at a time) and a rerun (every object committed: every key looked up)."""
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        where = [os.path.join(tmp, "archive"), os.path.join(tmp, "report"), str(n)]
        subprocess.run([sys.executable, "-c", SETUP, *where, str(chunk)], check=True)
        out = {}
        for mode in ("first", "rerun"):  # each in a fresh process: its peak memory is the plan's alone
            res = subprocess.run(
                [sys.executable, "-c", MEASURE, *where, mode], capture_output=True, text=True, check=True
            )
            out[mode] = json.loads(res.stdout.strip().splitlines()[-1])
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--factor", type=int, default=10)
    ap.add_argument("--chunk", type=int, default=2000, help="objects per committed part (the CLI default)")
    args = ap.parse_args()
    small, big = run(args.n, args.chunk), run(args.n * args.factor, args.chunk)
    f = args.factor
    for mode, what in (("first", "first run (nothing committed)"), ("rerun", "rerun (every object committed)")):
        a, b = small[mode], big[mode]
        assert a["listed"] == a["n"] and b["listed"] == b["n"]
        assert (a["to_score"], b["to_score"]) == ((a["n"], b["n"]) if mode == "first" else (0, 0)), (a, b)
        print(f"{what}:")
        for r in (a, b):
            print(
                f"  {r['n']:>9,} objects: plan {r['plan_seconds']:.2f}s, driver +{r['driver_bytes'] / 2**20:.0f} MiB "
                f"({r['driver_bytes'] / r['n']:.0f} B/object) over a {r['baseline_bytes'] / 2**20:.0f} MiB baseline"
            )
        print(
            f"  ratios at {f}x objects: plan time {b['plan_seconds'] / a['plan_seconds']:.1f}x, driver peak "
            f"{(b['baseline_bytes'] + b['driver_bytes']) / (a['baseline_bytes'] + a['driver_bytes']):.2f}x"
        )
    r, q = small["rerun"], big["rerun"]
    print(
        f"commit manifests (chunk {args.chunk}): {r['manifests']} ({r['manifest_bytes'] / 2**10:.0f} KiB) for "
        f"{r['n']:,} objects, {q['manifests']} ({q['manifest_bytes'] / 2**10:.0f} KiB) for {q['n']:,}: "
        f"{q['manifests'] / r['manifests']:.0f}x"
    )
    out = Path("bench-scale.json")
    out.write_text(json.dumps({"small": small, "big": big}, indent=2) + "\n")
    print(f"figures: {out}")


if __name__ == "__main__":
    main()
