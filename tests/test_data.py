from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from msc_ray import corpus, data
from msc_ray.config import DataConfig


@pytest.fixture()
def damaged_manifest(corpus_copy):
    """The small corpus with one truncated and one zero-byte image among the good ones."""
    root, _ = corpus_copy
    good = sorted((root / "sstack" / "3").glob("*.png"))
    good[0].write_bytes(good[0].read_bytes()[:100])
    good[1].write_bytes(b"")
    table, _ = corpus.index_corpus(str(root), folds=3, seed=0)
    return table, {f"sstack/3/{good[0].name}", f"sstack/3/{good[1].name}"}


def test_corrupt_images_become_error_records_and_nothing_else_is_lost(ray_session, damaged_manifest):
    table, bad = damaged_manifest
    rows = data.select(table, stack="sstack")
    cfg = DataConfig(size=32, channels=1, decode_batch=8)
    stats = data.BatchStats()
    seen = []
    table_labels = table.column("label").to_pylist()
    for imgs, labels, r in data.torch_batches(data.make_dataset(rows, cfg, train=True, epoch=0), 5, stats=stats):
        assert imgs.shape[1:] == (1, 32, 32) and imgs.dtype == torch.float32
        assert torch.isfinite(imgs).all()
        assert labels.tolist() == [table_labels[i] for i in r.tolist()]
        seen.extend(r.tolist())
    paths = table.column("path").to_pylist()
    assert stats.errors == 2 and {paths[i] for i in stats.error_rows} == bad
    expected = {i for i, p in enumerate(paths) if p.startswith("sstack/") and p not in bad}
    assert sorted(seen) == sorted(expected) and stats.images == len(expected)


def test_block_rows_rule_and_override():
    auto = DataConfig(size=32)
    # four tasks per CPU and pass, within [16, 128] images
    assert data.block_rows(1000, auto, cpus=2) == 125
    assert data.block_rows(1000, auto, cpus=16) == data.MIN_BLOCK
    assert data.block_rows(100_000, auto, cpus=2) == data.MAX_BLOCK
    assert data.block_rows(0, auto, cpus=2) == data.MIN_BLOCK
    assert data.block_rows(1000, DataConfig(size=32, decode_batch=8), cpus=2) == 8
    with pytest.raises(ValueError, match="decode_batch"):
        DataConfig(decode_batch=-1)


def test_folds_split_train_and_validation(ray_session, small_corpus):
    root, _ = small_corpus
    table, _ = corpus.index_corpus(str(root), folds=3, seed=0)
    cfg = DataConfig(size=32, channels=3)
    tr = data.select(table, stack="mstack", fold=1, train=True)
    va = data.select(table, stack="mstack", fold=1, train=False)
    assert set(tr["row"].to_pylist()).isdisjoint(va["row"].to_pylist())
    assert set(tr["group"].to_pylist()).isdisjoint(va["group"].to_pylist())
    assert tr.num_rows + va.num_rows == 24
    first = [
        torch.cat([x for x, _, _ in data.torch_batches(data.make_dataset(va, cfg, train=False, epoch=e), 8)])
        for e in (0, 1)
    ]
    assert first[0].shape == (va.num_rows, 3, 32, 32)
    assert torch.equal(first[0], first[1])  # validation: no augmentation, same order
    aug = [
        torch.cat([x for x, _, _ in data.torch_batches(data.make_dataset(tr, cfg, train=True, epoch=e), 8)])
        for e in (0, 1)
    ]
    assert not torch.equal(aug[0], aug[1])
    again = torch.cat([x for x, _, _ in data.torch_batches(data.make_dataset(tr, cfg, train=True, epoch=0), 8)])
    assert torch.equal(aug[0], again)  # reproducible per (seed, epoch, image)
    # both epochs in one streaming execution: each epoch as the dataset of that epoch alone gives it, in
    # its order, with its draws; batches of 5 are cut where the epochs meet
    assert tr.num_rows % 5
    both: dict[int, list] = {0: [], 1: []}
    ds = data.make_dataset(tr, cfg, train=True, epoch=0, epochs=2)
    for e, x, _, _ in data.torch_batches(ds, 5, by_epoch=True):
        both[e].append(x)
    assert torch.equal(torch.cat(both[0]), aug[0]) and torch.equal(torch.cat(both[1]), aug[1])
    assert sum(len(x) for x in both[0]) == tr.num_rows and len(both[0][-1]) == tr.num_rows % 5


def test_detection_split_carries_boxes(ray_session, small_corpus):
    root, truth = small_corpus
    table, _ = corpus.index_corpus(str(root), folds=3, seed=0)
    rows = data.select(table, stack="sstack")
    cfg = DataConfig(size=128, channels=3)  # upscaled 64 → 128: boxes scale by 2
    ds = data.make_dataset(rows, cfg, train=False, detection=True, max_boxes=data.max_box_count(table))
    by_path = {t["image"]: t for t in truth}
    paths = table.column("path").to_pylist()
    n_empty = n_boxes = 0
    for imgs, targets, r in data.torch_batches(ds, 6, detection=True):
        for img, tgt, row in zip(imgs, targets, r.tolist(), strict=True):
            assert img.shape == (3, 128, 128)
            want = np.array(by_path[paths[row]]["boxes"], np.float32).reshape(-1, 4) * 2
            assert tgt["boxes"].shape == want.shape and np.allclose(tgt["boxes"].numpy(), want)
            assert (tgt["labels"] == 1).all()
            n_empty += len(want) == 0
            n_boxes += len(want)
    assert n_empty > 0 and n_boxes > 0


def test_s3_dataset_reads_objects(ray_session, small_corpus, s3_server):
    from tests.conftest import upload_dir

    root, _ = small_corpus
    client = s3_server.client()
    client.create_bucket(Bucket="pipeline")
    upload_dir(client, root / "mstack", "pipeline", "c/mstack")
    table, _ = corpus.index_corpus("s3://pipeline/c", folds=2)
    cfg = DataConfig(size=32, channels=1, endpoint_url=s3_server.endpoint)
    stats = data.BatchStats()
    n = sum(
        len(x)
        for x, _, _ in data.torch_batches(data.make_dataset(data.select(table), cfg, train=False), 8, stats=stats)
    )
    assert n == 24 and stats.errors == 0


def test_cache_carries_covered_pixels_where_a_cell_mask_exists(ray_session, corpus_copy):
    """Coverage supervision reads each image's cell mask: its covered share is the image's confluence;
    an image whose mask is gone keeps its place, marked unknown; a corpus without masks gives none."""
    root, _ = corpus_copy
    table, _ = corpus.index_corpus(str(root), folds=3, seed=0)
    rows = data.select(table, stack="sstack")
    cfg = DataConfig(size=64, channels=3)
    plain = data.build_cache(rows, cfg)
    c = data.build_cache(rows, cfg, coverage=True)
    assert plain.covered is None and plain.covered_ok is None
    assert np.array_equal(c.images, plain.images) and c.covered.shape == (24, 64, 64) and c.covered_ok.all()
    assert np.abs(c.covered.mean((1, 2)) - c.confluence).max() < 0.01  # same size: the mask is the truth
    assert set(np.unique(c.covered)) <= {0, 1}
    gone = c.keys[5]
    cell_mask = root / "masks" / "sstack" / (gone.rsplit("/", 1)[-1])
    cell_mask.unlink()
    c2 = data.build_cache(rows, cfg, coverage=True)
    assert len(c2) == 24 and not c2.errors and np.array_equal(c2.images, plain.images)
    assert c2.covered_ok.tolist() == [k != gone for k in c2.keys]
    shutil.rmtree(root / "masks")
    c3 = data.build_cache(rows, cfg, coverage=True)
    assert len(c3) == 24 and c3.covered is None and c3.covered_ok is None
