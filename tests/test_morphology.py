from __future__ import annotations

import math

import numpy as np
import pytest
from skimage.draw import disk, ellipse

from msc_ray import morphology


def test_a_rectangle_and_an_ellipse_have_their_known_measures():
    cells = np.zeros((100, 120), np.uint16)
    cells[10:20, 10:50] = 1  # 10 rows × 40 columns
    rr, cc = ellipse(60, 70, 10, 20, shape=cells.shape)  # row radius 10, column radius 20
    cells[rr, cc] = 2
    nuclei = np.zeros_like(cells)
    rr, cc = disk((15, 30), 3, shape=cells.shape)
    nuclei[rr, cc] = 7
    rect, ell = morphology.cell_features(cells, nuclei)
    assert rect["area"] == 400
    # second moments of a 40 × 10 pixel block: variance (n² − 1)/12 along each side, axis = 4·sqrt(var)
    assert rect["major_axis"] == pytest.approx(4 * math.sqrt((40**2 - 1) / 12), rel=1e-6)
    assert rect["minor_axis"] == pytest.approx(4 * math.sqrt((10**2 - 1) / 12), rel=1e-6)
    assert rect["solidity"] == pytest.approx(1.0)
    assert abs(rect["orientation"]) == pytest.approx(math.pi / 2)  # long side along the columns
    assert rect["nucleus_area"] == np.count_nonzero(nuclei) == 25  # all inside the cell
    assert rect["nucleus_ratio"] == pytest.approx(25 / 400)
    assert rect["nucleus_aspect"] == pytest.approx(1.0)  # a disc
    assert ell["area"] == pytest.approx(math.pi * 10 * 20, rel=0.03)
    assert ell["major_axis"] == pytest.approx(40, rel=0.03) and ell["minor_axis"] == pytest.approx(20, rel=0.05)
    assert ell["aspect_ratio"] == pytest.approx(2.0, rel=0.05)
    assert ell["eccentricity"] == pytest.approx(math.sqrt(1 - 0.25), abs=0.01)
    assert ell["solidity"] > 0.97 and ell["nucleus_area"] == 0 and math.isnan(ell["nucleus_aspect"])
    assert not rect["touches_border"] and not ell["touches_border"]


def test_a_nucleus_keeps_its_cells_id_and_its_own_shape():
    cells = np.zeros((40, 60), np.uint16)
    cells[5:15, 5:45] = 3
    cells[20:36, 5:21] = 4
    nuclei = np.zeros_like(cells)
    nuclei[8:12, 10:22] = 3  # 4 rows × 12 columns
    nuclei[25:31, 10:16] = 4  # a square
    long, square = morphology.cell_features(cells, nuclei)
    # second moments of an n × m block: axis ratio sqrt((n² − 1) / (m² − 1))
    assert long["nucleus_aspect"] == pytest.approx(math.sqrt((12**2 - 1) / (4**2 - 1)))
    assert long["nucleus_area"] == 48 and square["nucleus_aspect"] == pytest.approx(1.0)
    img = morphology.image_features([long, square], cells.shape)
    assert img["nucleus_aspect_median"] == pytest.approx((long["nucleus_aspect"] + 1) / 2)
    assert img["nucleus_area_median"] == pytest.approx((48 + 36) / 2)


def test_image_summary_counts_covers_and_finds_flattened_and_aligned_cells():
    cells = np.zeros((200, 200), np.uint16)
    for i in range(4):  # four spindles along the rows
        cells[20 + 30 * i : 24 + 30 * i, 20:60] = i + 1
    rr, cc = disk((150, 150), 20, shape=cells.shape)  # one big round cell
    cells[rr, cc] = 5
    rows, img = morphology.features(cells)
    assert [r["flattened"] for r in rows] == [False] * 4 + [True]
    assert img["cell_count"] == 5 and img["flattened_share"] == pytest.approx(0.2)
    assert img["confluence_pct"] == pytest.approx(100 * np.count_nonzero(cells) / cells.size)
    assert img["density"] == pytest.approx(1e4 * 5 / 40_000)
    assert img["area_median"] == 160 and img["alignment"] < 0.9  # the disc's axis is arbitrary
    parallel, _ = morphology.features(cells * (cells < 5))
    assert morphology.image_features(parallel, cells.shape)["alignment"] == pytest.approx(1.0)
    assert np.isnan(img["nucleus_ratio_median"])  # no nucleus mask given


def test_no_cells_and_one_cell_over_the_whole_image_give_rows():
    rows, img = morphology.features(np.zeros((64, 64), np.uint16))
    assert rows == [] and img["cell_count"] == 0 and img["confluence_pct"] == 0
    assert np.isnan(img["area_median"]) and np.isnan(img["flattened_share"])
    rows, img = morphology.features(np.ones((64, 64), np.uint16))
    assert len(rows) == 1 and rows[0]["touches_border"] and img["confluence_pct"] == 100
    assert img["area_median"] == 64 * 64  # only border cells: they are the statistics
    with pytest.raises(ValueError, match="integer ids"):
        morphology.features(np.zeros((8, 8), np.float32))


def test_a_corpus_masks_are_measured_against_their_exact_truth(ray_session, corpus_copy, tmp_path):
    import pyarrow.parquet as pq

    root, rows = corpus_copy
    (root / "masks" / "sstack" / "broken.png").write_bytes(b"not a png")
    res = morphology.measure_corpus(str(root), str(tmp_path / "feat"))
    assert res["n_images"] == len(rows) + 1 and res["errors"] == 1
    imgs = pq.read_table(res["images"]).to_pandas().set_index(["stack", "stem"])
    assert imgs.loc[("sstack", "broken"), "error"].startswith(str(root / "masks" / "sstack" / "broken.png"))
    truth = pq.read_table(root / "truth.parquet").to_pandas()
    for t in truth.itertuples():
        m = imgs.loc[(t.stack, t.image.rsplit("/", 1)[-1].rsplit(".", 1)[0])]
        # the synthetic truth is measured on the same masks: equal, not close
        assert m["confluence_pct"] == pytest.approx(100 * t.confluence, abs=1e-6)
        assert m["cell_count"] == t.cell_count
        assert m["vessel"] == t.vessel and m["day"] == t.day  # joined from metadata.csv
    cells = pq.read_table(res["cells"]).to_pandas()
    assert len(cells) == res["n_cells"] == int(truth["cell_count"].sum())
