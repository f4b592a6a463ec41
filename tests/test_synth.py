from __future__ import annotations

import csv
import hashlib
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree as ET

import numpy as np
import pyarrow.parquet as pq
import pytest
import tifffile
from PIL import Image

from msc_ray import BAND_NAMES, synth


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_gives_byte_identical_corpus(tmp_path):
    cfg = synth.SynthConfig(n=6, size=64, seed=11)
    synth.synthesize(tmp_path / "a", cfg)
    synth.synthesize(tmp_path / "b", synth.SynthConfig(n=6, size=64, seed=11, workers=2))
    synth.synthesize(tmp_path / "c", synth.SynthConfig(n=6, size=64, seed=12))
    a, b, c = (_tree_digest(tmp_path / x) for x in "abc")
    a.pop("synth_config.json"), b.pop("synth_config.json")  # records the worker count
    assert a == b
    assert len(a) > 20
    shared = set(a) & set(c)
    assert any(a[k] != c[k] for k in shared if k.endswith(".png"))


def test_every_band_populated_in_both_stacks(small_corpus):
    _, rows = small_corpus
    for stack in ("sstack", "mstack"):
        labels = {r["label"] for r in rows if r["stack"] == stack}
        assert labels == set(BAND_NAMES), (stack, labels)


def test_some_images_sit_near_band_edges(small_corpus):
    _, rows = small_corpus
    near = [r for r in rows if min(abs(r["confluence"] - e) for e in (0.4, 0.6, 0.8)) < 0.04]
    assert len(near) >= 3


def test_truth_confluence_equals_mask_coverage_and_class(small_corpus):
    root, rows = small_corpus
    truth = pq.read_table(root / "truth.parquet").to_pylist()
    assert len(truth) == len(rows) == 48
    for r in truth:
        mask = np.asarray(Image.open(root / r["mask"]))
        assert mask.shape == (64, 64)
        assert r["confluence"] == pytest.approx(np.count_nonzero(mask) / mask.size, abs=1e-12)
        assert r["class"] == synth.band_of(r["confluence"])
        assert Path(r["image"]).parent.name == r["label"] == str(r["class"])
        assert r["cell_count"] == len(np.unique(mask[mask > 0]))


def test_voc_boxes_inside_image_and_enclose_an_abnormal_cell(small_corpus):
    root, _ = small_corpus
    truth = {r["image"]: r for r in pq.read_table(root / "truth.parquet").to_pylist()}
    n_boxes = 0
    for xml in sorted((root / "sstack" / "annotations").glob("*.xml")):
        tree = ET.parse(xml).getroot()
        name = tree.findtext("filename")
        r = next(v for k, v in truth.items() if k.startswith("sstack/") and Path(k).name == name)
        mask = np.asarray(Image.open(root / r["mask"]))
        objs = tree.findall("object")
        assert len(objs) == r["n_abnormal"] == len(r["abnormal_ids"])
        for obj, cid, box in zip(objs, r["abnormal_ids"], r["boxes"], strict=True):
            assert obj.findtext("name") == "Flatten"
            bb = obj.find("bndbox")
            x1, y1 = int(bb.findtext("xmin")) - 1, int(bb.findtext("ymin")) - 1  # VOC is 1-based
            x2, y2 = int(bb.findtext("xmax")), int(bb.findtext("ymax"))
            assert [x1, y1, x2, y2] == list(box)
            assert 0 <= x1 < x2 <= 64 and 0 <= y1 < y2 <= 64
            ys, xs = np.nonzero(mask == cid)
            assert len(ys) > 0
            # the box is the tight box of that abnormal cell
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x1, y1, x2, y2)
            n_boxes += 1
    assert n_boxes >= 5


def test_abnormal_cells_are_several_times_normal_size(tmp_path):
    rows = synth.synthesize(tmp_path, synth.SynthConfig(n=15, size=256, stack="sstack", seed=5, abnormal_fraction=1.0))
    ratios = []
    for r in rows:
        mask = np.asarray(Image.open(tmp_path / r["mask"]))
        areas = np.bincount(mask.ravel())
        normal = [areas[i] for i in range(1, len(areas)) if i not in r["abnormal_ids"] and areas[i] > 0]
        assert normal, r["image"]  # abnormal cells never crowd out the normal ones
        for cid in r["abnormal_ids"]:
            ratios.append(areas[cid] / np.median(normal))
    assert len(ratios) >= 10 and np.median(ratios) > 3


def test_layout_matches_design(small_corpus):
    root, rows = small_corpus
    for stack in ("sstack", "mstack"):
        assert sorted(p.name for p in (root / stack).iterdir() if p.is_dir()) == sorted(
            list(BAND_NAMES) + (["annotations"] if stack == "sstack" else [])
        )
    images = sorted(str(p.relative_to(root)) for p in root.glob("*/[1-4]/*.png"))
    assert images == sorted(r["image"] for r in rows)
    with open(root / "metadata.csv") as fh:
        meta = list(csv.DictReader(fh))
    assert list(meta[0]) == ["image", "vessel", "day", "position", "confluence", "potency"]
    truth = {r["image"]: r["confluence"] for r in rows}
    assert all(float(m["confluence"]) == pytest.approx(truth[m["image"]], abs=1e-4) for m in meta)
    assert sorted(m["image"] for m in meta) == images
    assert {m["position"] for m in meta} == set(synth.POSITIONS)
    # a vessel is photographed on consecutive days; its culture grows over them
    by_vessel: dict[str, dict[int, list[float]]] = {}
    for r in rows:
        by_vessel.setdefault(r["vessel"], {}).setdefault(r["day"], []).append(r["confluence"])
    for days in by_vessel.values():
        assert sorted(days) == list(range(1, len(days) + 1))
        means = [np.mean(days[d]) for d in sorted(days)]
        assert means[-1] > means[0] or len(means) == 1
    stems = [Path(r["image"]).stem for r in rows if r["stack"] == "sstack"]
    assert sorted(p.stem for p in (root / "sstack" / "annotations").glob("*.xml")) == sorted(stems)


@pytest.mark.parametrize("fmt", ["jpg", "tif"])
def test_other_formats(tmp_path, fmt):
    rows = synth.synthesize(tmp_path, synth.SynthConfig(n=3, size=64, stack="mstack", fmt=fmt, seed=1))
    path = tmp_path / rows[0]["image"]
    assert path.suffix == f".{fmt}"
    if fmt == "tif":
        arr = tifffile.imread(path)
        assert arr.dtype == np.uint16 and arr.shape == (64, 64) and arr.max() > 255
    else:
        assert Image.open(path).size == (64, 64)


def test_preview_has_one_tile_per_stack_and_class(small_corpus, tmp_path):
    root, rows = small_corpus
    dest = synth.preview(root, rows, tmp_path / "sheet.png", tile=96)
    img = Image.open(dest)
    assert img.width > 4 * 96 and img.height > 2 * 96
    # red box outlines were drawn on the single-stack row
    arr = np.asarray(img.convert("RGB")).astype(int)
    assert np.count_nonzero((arr[..., 0] > 200) & (arr[..., 1] < 80)) > 20


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "msc_ray.cli", *args], capture_output=True, text=True)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--n", "0"], "--n"),
        (["--stack", "tristack"], "--stack"),
        (["--format", "bmp"], "--format"),
    ],
)
def test_bad_options_give_one_line_and_exit_1(tmp_path, args, needle):
    res = _cli("synth", str(tmp_path / "out"), *args)
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0]
    assert "Traceback" not in res.stderr


def test_unwritable_out_gives_one_line_and_exit_1(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    res = _cli("synth", str(blocker / "corpus"), "--n", "2", "--size", "64")
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "not writable" in lines[0] and str(blocker / "corpus") in lines[0]


def test_cli_writes_corpus_and_preview(tmp_path):
    res = _cli("synth", str(tmp_path / "c"), "--n", "8", "--size", "64", "--preview", str(tmp_path / "p.png"))
    assert res.returncode == 0, res.stderr
    assert "wrote 16 images" in res.stdout
    assert (tmp_path / "p.png").stat().st_size > 1000
    assert (tmp_path / "c" / "truth.parquet").exists()


def test_hidden_biology_drives_the_cells_and_the_documented_potency(tmp_path):
    """Each vessel's biology is fixed but for the documented daily drift, potency is the documented
    formula plus assay noise of the documented SD, shared by a vessel-day's images, and the biology
    is visible in the exact cell and nucleus masks."""
    import pandas as pd

    from msc_ray import morphology

    synth.synthesize(tmp_path, synth.SynthConfig(n=200, size=128, stack="sstack", seed=8, workers=2))
    t = pq.read_table(tmp_path / "truth.parquet").to_pandas()
    meta = pd.read_csv(tmp_path / "metadata.csv").set_index("image")
    assert np.allclose(meta.loc[t["image"], "potency"].to_numpy(), t["potency"], atol=1e-3)
    for _, v in t.groupby("vessel"):
        assert v["cell_size"].nunique() == 1 and v["nucleus_factor"].nunique() == 1
        first = v[v["day"] == v["day"].min()].iloc[0]
        assert np.allclose(v["elongation"], first["elongation"] - 0.02 * (v["day"] - first["day"]))
    per_day = t.groupby(["vessel", "day"])
    assert (per_day["potency"].nunique() == 1).all()
    bio = [
        synth.Biology(r.elongation, r.cell_size, r.nucleus_factor, r.flattening) for r in per_day.first().itertuples()
    ]
    noise = per_day.first()["potency"].to_numpy() - [synth.potency_of(b, 0.0) for b in bio]
    assert abs(noise.mean()) < 0.5 and 0.7 * synth.POTENCY_NOISE < noise.std() < 1.4 * synth.POTENCY_NOISE

    measured = []
    for r in t.itertuples():
        cells = np.asarray(Image.open(tmp_path / r.mask)).astype(np.int64)
        nuclei = np.asarray(Image.open(tmp_path / r.nucleus_mask)).astype(np.int64)
        assert nuclei.dtype == cells.dtype and nuclei.shape == cells.shape
        assert np.all((nuclei == 0) | (nuclei == cells))  # a nucleus pixel is its own cell's pixel
        assert set(np.unique(nuclei[nuclei > 0])) <= set(np.unique(cells[cells > 0]))
        measured.append(morphology.features(cells, nuclei)[1])
    m = pd.DataFrame(measured)
    assert np.corrcoef(t["nucleus_factor"], m["nucleus_ratio_median"])[0, 1] > 0.8
    assert np.corrcoef(t["elongation"], m["aspect_ratio_median"])[0, 1] > 0.4
    # spread-out cells widen the spread of shapes (occlusion by neighbours cuts most of them below
    # the flattened-cell area rule, so their share is not where they show)
    assert np.corrcoef(t["flattening"], m["aspect_ratio_iqr"])[0, 1] > 0.3
    assert np.corrcoef(t["cell_size"], m["area_median"])[0, 1] > 0.3
