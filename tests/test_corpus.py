from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from msc_ray import corpus
from tests.conftest import upload_dir


def test_index_matches_truth(small_corpus):
    root, _ = small_corpus
    table, summary = corpus.index_corpus(str(root), folds=5, seed=0)
    truth = {r["image"]: r for r in pq.read_table(root / "truth.parquet").to_pylist()}
    rows = table.to_pylist()
    assert summary.n_images == len(rows) == len(truth) == 48
    info = corpus.manifest_info(table)
    assert info["classes"] == {"mstack": ["1", "2", "3", "4"], "sstack": ["1", "2", "3", "4"]}
    for r in rows:
        t = truth[r["path"]]
        assert r["stack"] == t["stack"] and r["label_name"] == t["label"]
        assert info["classes"][r["stack"]][r["label"]] == r["label_name"]
        assert (r["width"], r["height"]) == (64, 64) and r["image_error"] is None
        assert r["vessel"] == t["vessel"] == r["group"] and r["day"] == t["day"] and r["position"] == t["position"]
        assert [[b["x1"], b["y1"], b["x2"], b["y2"]] for b in r["boxes"]] == [list(map(float, b)) for b in t["boxes"]]
        assert all(b["label"] == "Flatten" for b in r["boxes"])
        assert r["annotation"] == ("ok" if r["stack"] == "sstack" else None)
        assert r["uri"].endswith(r["path"]) and 0 <= r["fold"] < 5


def test_no_vessel_crosses_folds_and_folds_are_deterministic(small_corpus):
    root, _ = small_corpus
    a, summary = corpus.index_corpus(str(root), folds=4, seed=7)
    b, _ = corpus.index_corpus(str(root), folds=4, seed=7)
    c, _ = corpus.index_corpus(str(root), folds=4, seed=8)
    assert a.column("fold").to_pylist() == b.column("fold").to_pylist()
    assert a.column("fold").to_pylist() != c.column("fold").to_pylist()
    folds_of: dict[str, set[int]] = {}
    for r in a.to_pylist():
        folds_of.setdefault(r["group"], set()).add(r["fold"])
    assert all(len(f) == 1 for f in folds_of.values())
    assert summary.grouped_by == {"mstack": "vessel", "sstack": "vessel"}
    for stack in ("sstack", "mstack"):
        assert set(summary.fold_counts[stack]) == {0, 1, 2, 3}
    assert any("fold" in line for line in summary.lines())


def test_without_metadata_folds_stratify_by_class(corpus_copy):
    root, _ = corpus_copy
    (root / "metadata.csv").unlink()
    table, summary = corpus.index_corpus(str(root), folds=3, seed=0)
    assert summary.grouped_by["sstack"] == "image"
    rows = [r for r in table.to_pylist() if r["stack"] == "sstack"]
    assert all(r["group"] == r["path"] for r in rows)
    # StratifiedKFold: each class is spread over folds as evenly as it can be
    for lab in {r["label"] for r in rows}:
        per_fold = np.bincount([r["fold"] for r in rows if r["label"] == lab], minlength=3)
        assert per_fold.max() - per_fold.min() <= 1


def test_bad_files_are_reported_and_kept(corpus_copy):
    root, _ = corpus_copy
    (root / "sstack" / "1" / "readme.txt").write_text("not an image")
    (root / "sstack" / "2" / "UPPER.PNG").write_bytes((next((root / "sstack" / "2").glob("*.png"))).read_bytes())
    (root / "sstack" / "2" / "empty.png").write_bytes(b"")
    xmls = sorted((root / "sstack" / "annotations").glob("*.xml"))
    xmls[0].write_text("<annotation><object><name>Flatten</name>")  # malformed
    xmls[1].unlink()  # missing
    table, summary = corpus.index_corpus(str(root), folds=3)
    rows = {r["path"]: r for r in table.to_pylist()}
    assert summary.skipped == {".txt": 1}
    assert "sstack/2/UPPER.PNG" in rows
    assert rows["sstack/2/empty.png"]["image_error"].startswith("sstack/2/empty.png: empty file")
    bad = [r for r in rows.values() if r["annotation"] == "malformed"]
    missing = [r for r in rows.values() if r["annotation"] == "missing"]
    assert len(bad) == 1 and xmls[0].name in bad[0]["annotation_error"] and bad[0]["boxes"] == []
    # the new UPPER.PNG and empty.png have no annotation either
    assert {r["path"].split("/")[-1].rsplit(".", 1)[0] for r in missing} >= {xmls[1].stem}
    text = "\n".join(summary.lines())
    assert xmls[0].name in text and xmls[1].name in text and "skipped 1 files" in text


def test_voc_any_label_and_many_objects():
    xml = b"""<annotation><object><name>Flatten</name><bndbox><xmin>1</xmin><ymin>2</ymin><xmax>10</xmax>
    <ymax>12</ymax></bndbox></object><object><name>round</name><bndbox><xmin>5.5</xmin><ymin>5</ymin>
    <xmax>9</xmax><ymax>9</ymax></bndbox></object></annotation>"""
    boxes = corpus.parse_voc(xml, "a.xml")
    assert boxes == [
        {"x1": 0.0, "y1": 1.0, "x2": 10.0, "y2": 12.0, "label": "Flatten"},
        {"x1": 4.5, "y1": 4.0, "x2": 9.0, "y2": 9.0, "label": "round"},
    ]
    with pytest.raises(ValueError, match="a.xml"):
        corpus.parse_voc(b"<annotation><object><name>x</name></object></annotation>", "a.xml")


def test_s3_index_equals_local_index(small_corpus, s3_server):
    root, _ = small_corpus
    client = s3_server.client()
    client.create_bucket(Bucket="corpora")
    upload_dir(client, root, "corpora", "plant-a/batch-1")
    local, ls = corpus.index_corpus(str(root), folds=5, seed=1)
    remote, rs = corpus.index_corpus("s3://corpora/plant-a/batch-1", folds=5, seed=1)
    assert remote.column("uri")[0].as_py().startswith("s3://corpora/plant-a/batch-1/")
    assert local.drop_columns(["uri"]).equals(remote.drop_columns(["uri"]))
    assert ls.lines()[1:] == rs.lines()[1:]
    dest = corpus.write_manifest(remote, "s3://corpora/plant-a/batch-1/manifest.parquet")
    again = corpus.read_manifest(dest)
    assert again.equals(remote)


def test_cli_index_writes_manifest_and_summary(small_corpus, tmp_path):
    root, _ = small_corpus
    out = tmp_path / "m.parquet"
    res = subprocess.run(
        [sys.executable, "-m", "msc_ray.cli", "index", str(root), "--out", str(out), "--folds", "3"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    assert "indexed 48 images" in res.stdout and "fold" in res.stdout and str(out) in res.stdout
    assert pq.read_table(out).num_rows == 48
    res = subprocess.run(
        [sys.executable, "-m", "msc_ray.cli", "index", str(root), "--folds", "40"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 1 and res.stderr.strip().startswith("error: --folds 40")
    assert len(res.stderr.strip().splitlines()) == 1
