"""Ray Data pipelines over the manifest, shared by the classifier search, the detector and scoring.

A split is built for one fold: training rows (every other fold, augmented) or validation rows (that
fold, resize and normalise only). Rows are read, decoded and transformed by CPU tasks in blocks of
:func:`block_rows` images and streamed to the consumer with ``iter_torch_batches``.

A row whose image cannot be read or decoded becomes an *error record* (``ok = False``, a blank image)
and is logged with the file named; :func:`torch_batches` drops it and counts it, so one bad file never
fails an epoch nor drops the good images of its batch.

Columns of a classification split: ``image`` float32 (C, S, S), ``label`` int64, ``ok`` bool, ``row``
int64 (index into the manifest). A detection split adds ``boxes`` float32 (B, 4) ``[x1, y1, x2, y2]``
pixels in the resized frame, zero-padded to the manifest's largest box count B, and ``n_boxes`` int64.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from . import augment, images, storage
from .config import DataConfig

log = logging.getLogger(__name__)


def read_uri(uri: str, endpoint_url: str | None = None, max_attempts: int = storage.SDK_ATTEMPTS) -> bytes:
    """The bytes of a local file or an S3 object (the S3 filesystem is cached per process;
    ``max_attempts``: the SDK's tries per request)."""
    if storage.is_s3(uri):
        return storage.read_bytes(uri, endpoint_url, max_attempts)
    with open(uri, "rb") as fh:
        return fh.read()


def load_image(uri: str, name: str, cfg: DataConfig) -> np.ndarray:
    """Read and decode one image into float32 (cfg.channels, H, W); raises ImageError or OSError."""
    img = images.decode(read_uri(uri, cfg.endpoint_url), name, cfg.max_pixels)
    return images.to_channels(img, cfg.channels)


def mask_uris(uri: str, path: str, stack: str) -> tuple[str, str]:
    """An image's cell and nucleus instance masks in its corpus (``masks/<stack>/<stem>.png`` and
    ``masks/<stack>/nuclei/<stem>.png``), from its URI and its path inside the corpus."""
    root = uri[: len(uri) - len(path)] if uri.endswith(path) else uri.rsplit("/", 3)[0] + "/"
    stem = PurePosixPath(path).stem
    return f"{root}masks/{stack}/{stem}.png", f"{root}masks/{stack}/nuclei/{stem}.png"


def load_label_map(uri: str, endpoint_url: str | None = None) -> np.ndarray:
    """A 16-bit instance mask (PNG) → int32 (H, W); raises ValueError naming the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(read_uri(uri, endpoint_url))) as im:
            arr = np.asarray(im)
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{uri}: not a readable instance mask ({exc})") from None
    if arr.ndim != 2 or arr.dtype.kind not in "iu":
        raise ValueError(f"{uri}: an instance mask must be one channel of integer ids, got {arr.dtype} {arr.shape}")
    return arr.astype(np.int32)


def _covered(uri: str, path: str, stack: str, shape: tuple[int, int], endpoint_url: str | None):
    """The pixels cells cover (uint8 (1, H, W) ``tv_tensors.Mask``, from the cell instance mask), or
    None where the image has no readable mask of its size: coverage supervision is optional per image."""
    try:
        cells = load_label_map(mask_uris(uri, path, stack)[0], endpoint_url)
    except (OSError, ValueError):
        return None
    if cells.shape != shape:
        return None
    return tv_tensors.Mask(torch.from_numpy((cells > 0).astype(np.uint8))[None])


def _read_sample(
    batch: dict, i: int, cfg: DataConfig, detection: bool, masks: bool = False, coverage: bool = False
) -> tuple[dict | None, str]:
    """Row ``i`` of a block → ``({"image", ["boxes"], ["masks"], ["covered"]}, "")`` as tv_tensors, or
    ``(None, error line)``. ``masks``: the cell and nucleus instance maps as one (2, H, W)
    ``tv_tensors.Mask``. ``coverage``: the covered pixels (:func:`_covered`; None where unknown — the
    image is still read)."""
    uri, path = str(batch["uri"][i]), str(batch["path"][i])
    try:
        arr = load_image(uri, path, cfg)
        if masks:
            cell_uri, nuc_uri = mask_uris(uri, path, str(batch["stack"][i]))
            label = np.stack([load_label_map(cell_uri, cfg.endpoint_url), load_label_map(nuc_uri, cfg.endpoint_url)])
            if label.shape[-2:] != arr.shape[-2:]:
                raise ValueError(f"{cell_uri}: mask {label.shape[-2:]} and image {arr.shape[-2:]} differ in size")
    except (images.ImageError, OSError, ValueError) as exc:
        msg = str(exc) if isinstance(exc, images.ImageError | ValueError) else f"{path}: {storage.describe_error(exc)}"
        log.warning("error record: %s", msg)
        return None, msg
    h, w = arr.shape[-2:]
    sample: dict = {"image": tv_tensors.Image(torch.from_numpy(arr))}
    if masks:
        sample["masks"] = tv_tensors.Mask(torch.from_numpy(label))
    if coverage:
        sample["covered"] = _covered(uri, path, str(batch["stack"][i]), (h, w), cfg.endpoint_url)
    if detection:
        raw = batch["boxes"][i]
        xyxy = np.array([[b["x1"], b["y1"], b["x2"], b["y2"]] for b in raw], np.float32).reshape(-1, 4)
        sample["boxes"] = tv_tensors.BoundingBoxes(torch.from_numpy(xyxy), format="XYXY", canvas_size=(h, w))
    return sample, ""


def _transform_batch(
    batch: dict[str, np.ndarray], *, cfg: DataConfig, train: bool, max_boxes: int
) -> dict[str, np.ndarray]:
    """Ray Data task: a block of manifest rows → model-ready tensors (one error record per bad row),
    each row augmented with the draws of its own ``epoch``."""
    detection = max_boxes > 0
    tf = augment.build(cfg, train=train, boxes=detection)
    n = len(batch["uri"])
    out_img = np.zeros((n, cfg.channels, cfg.size, cfg.size), np.float32)
    ok = np.zeros(n, bool)
    out_boxes = np.zeros((n, max(max_boxes, 1), 4), np.float32)
    n_boxes = np.zeros(n, np.int64)
    for i in range(n):
        sample, _ = _read_sample(batch, i, cfg, detection)
        if sample is None:
            continue
        if detection:
            sample["labels"] = torch.ones(len(sample["boxes"]), dtype=torch.int64)
        seed = augment.sample_seed(cfg.seed, int(batch["epoch"][i]), str(batch["path"][i]))
        res = augment.apply(tf, sample, seed)
        out_img[i] = res["image"].numpy()
        ok[i] = True
        if detection:
            bx = res["boxes"].as_subclass(torch.Tensor).numpy()[:max_boxes]
            out_boxes[i, : len(bx)] = bx
            n_boxes[i] = len(bx)
    out = {
        "image": out_img,
        "label": batch["label"].astype(np.int64),
        "ok": ok,
        "row": batch["row"].astype(np.int64),
        "epoch": batch["epoch"].astype(np.int64),
    }
    if detection:
        out["boxes"] = out_boxes
        out["n_boxes"] = n_boxes
    return out


def select(manifest: pa.Table, *, stack: str | None = None, fold: int | None = None, train: bool = True) -> pa.Table:
    """Rows of one stack; with ``fold`` the training (other folds) or validation (that fold) rows.
    Adds a ``row`` column: the row's index in ``manifest``."""
    t = manifest.append_column("row", pa.array(np.arange(manifest.num_rows), pa.int64()))
    if stack is not None:
        t = t.filter(pc.equal(t["stack"], stack))
    if fold is not None:
        t = t.filter(pc.not_equal(t["fold"], fold) if train else pc.equal(t["fold"], fold))
    if t.num_rows == 0:
        raise ValueError(f"no images for stack={stack} fold={fold} ({'training' if train else 'validation'} split)")
    return t


def max_box_count(manifest: pa.Table) -> int:
    lengths = pc.list_value_length(manifest["boxes"]).fill_null(0)
    return max(int(pc.max(lengths).as_py() or 0), 1)


TASKS_PER_CPU = 4  # Ray Data tasks per cluster CPU and pass over a split (load balance, a short tail)
MIN_BLOCK, MAX_BLOCK = 16, 128  # images per task: below, scheduling costs per image; above, memory and the tail


def block_rows(n_rows: int, cfg: DataConfig, cpus: float | None = None) -> int:
    """Images per Ray Data task for a pass over ``n_rows``: ``cfg.decode_batch`` where set; otherwise
    enough for ``TASKS_PER_CPU`` tasks per CPU of the cluster (``cpus``, default Ray's), within
    [``MIN_BLOCK``, ``MAX_BLOCK``]. Each task costs some 13 ms of scheduling and a block's transfer on
    top of its images; on 2 CPUs, blocks of 128 images ran 1.3 times the images/s of blocks of 32."""
    if cfg.decode_batch:
        return cfg.decode_batch
    if cpus is None:
        import ray

        cpus = ray.cluster_resources().get("CPU", 1.0) if ray.is_initialized() else 1.0
    per_task = -(-max(n_rows, 1) // int(TASKS_PER_CPU * max(cpus, 1.0)))
    return int(min(MAX_BLOCK, max(MIN_BLOCK, per_task)))


def ordered_blocks(blocks: list[pa.Table]):
    """A Ray Dataset of these Arrow blocks, one task's input each, for a single map stage. Settings on
    the dataset's own context, not the process-wide one:

    - order kept: the same rows (and, in training, the same (seed, epoch)) give the same batches in
      the same order;
    - no per-operator reservation: with one map operator it only halves the tasks that run at once
      (on a 2-CPU node it ran one task at a time)."""
    import ray

    ds = ray.data.from_arrow(blocks)
    ds.context.execution_options.preserve_order = True
    ds.context.op_resource_reservation_enabled = False
    return ds


def make_dataset(
    rows: pa.Table,
    cfg: DataConfig,
    *,
    train: bool,
    epoch: int = 0,
    epochs: int = 1,
    detection: bool = False,
    max_boxes: int = 0,
):
    """A Ray Dataset over ``rows`` (from :func:`select`) for ``epochs`` consecutive epochs from
    ``epoch``, in one streaming execution: each epoch's rows in their own order (training: shuffled per
    (seed, epoch)) with their own augmentation draws, the same as a dataset built for that epoch alone;
    a row carries its ``epoch`` (:func:`torch_batches` with ``by_epoch``). The next epoch's first blocks
    are decoded while the consumer takes the last ones of this epoch, instead of a new execution
    starting cold each epoch (on 2 cores: about 0.3 s before the first block of every epoch)."""

    keep = ["uri", "path", "label", "row"] + (["boxes"] if detection else [])
    step = block_rows(rows.num_rows, cfg)
    blocks = []
    for e in range(epoch, epoch + epochs):
        part = rows
        if train:
            part = rows.take(pa.array(np.random.default_rng([cfg.seed, e]).permutation(rows.num_rows)))
        part = part.select(keep).append_column("epoch", pa.array(np.full(part.num_rows, e, np.int64)))
        blocks += [part.slice(i, step) for i in range(0, part.num_rows, step)]
    return ordered_blocks(blocks).map_batches(
        _transform_batch,
        fn_kwargs={"cfg": cfg, "train": train, "max_boxes": max(max_boxes, 1) if detection else 0},
        batch_size=step,
        batch_format="numpy",
        num_cpus=1,
    )


@dataclass
class BatchStats:
    """What :func:`torch_batches` saw: good images and error records dropped."""

    images: int = 0
    errors: int = 0
    error_rows: list[int] = field(default_factory=list)


def _epoch_parts(batch: dict) -> Iterator[dict]:
    """A batch cut where its rows' ``epoch`` changes (a batch can hold the end of one epoch and the
    start of the next)."""
    ep = batch["epoch"]
    cuts = [0, *((ep[1:] != ep[:-1]).nonzero().flatten() + 1).tolist(), len(ep)]
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        yield batch if (a, b) == (0, len(ep)) else {k: v[a:b] for k, v in batch.items()}


def torch_batches(
    source,
    batch_size: int,
    *,
    stats: BatchStats | None = None,
    detection: bool = False,
    device: str | torch.device = "cpu",
    drop_last: bool = False,
    prefetch_batches: int = 2,
    keep_empty: bool = False,
    by_epoch: bool = False,
) -> Iterator:
    """Iterate a Ray Dataset or a Ray Train shard (``DataIterator``) as torch batches, dropping
    error records and counting them in ``stats``. With ``keep_empty`` a batch of nothing but error
    records is yielded empty instead of skipped.

    Classification yields ``(images (N, C, S, S), labels (N,), rows (N,))``; detection yields
    ``(list of images (C, S, S), list of {"boxes": (k, 4), "labels": (k,)}, rows)``. With ``by_epoch``
    (a dataset over several epochs, :func:`make_dataset`) each is preceded by its epoch, ``(epoch,
    ...)``, and no batch holds two epochs."""
    stats = stats if stats is not None else BatchStats()
    for whole in source.iter_torch_batches(
        batch_size=batch_size, device=device, drop_last=drop_last, prefetch_batches=prefetch_batches
    ):
        for batch in _epoch_parts(whole) if by_epoch else (whole,):
            head = (int(batch["epoch"][0]),) if by_epoch else ()
            ok = batch["ok"].bool()
            bad = (~ok).nonzero().flatten()
            if len(bad):
                stats.errors += len(bad)
                stats.error_rows.extend(batch["row"][bad].tolist())
            if not ok.any():
                if keep_empty:  # e.g. DDP: every rank must take the same number of steps
                    empty, none = batch["image"][:0], batch["row"][:0]
                    yield (*head, *((list(empty), [], none) if detection else (empty, batch["label"][:0], none)))
                continue
            stats.images += int(ok.sum())
            if len(bad):
                batch = {k: v[ok] for k, v in batch.items()}
            imgs, labels, rows = batch["image"], batch["label"], batch["row"]
            if not detection:
                yield (*head, imgs, labels, rows)
                continue
            boxes, counts = batch["boxes"], batch["n_boxes"]
            targets = [
                {
                    "boxes": boxes[i, : int(counts[i])],
                    "labels": torch.ones(int(counts[i]), dtype=torch.int64, device=boxes.device),
                }
                for i in range(len(imgs))
            ]
            yield (*head, list(imgs), targets, rows)


# --------------------------------------------------------------------------------------------------
# Decode once: the cache that trials and detector workers augment from every epoch
# --------------------------------------------------------------------------------------------------


def _cache_batch(
    batch: dict[str, np.ndarray], *, cfg: DataConfig, detection: bool, masks: bool = False, coverage: bool = False
) -> dict[str, np.ndarray]:
    """Ray Data task: a block of manifest rows → uint8 (C, S, S) after decode, equalise and resize
    (no augmentation, no normalisation); boxes follow the resize, instance masks and covered pixels
    too (nearest neighbour, ids kept). A bad row becomes an error record; a missing mask under
    ``coverage`` only marks the row's coverage unknown."""
    tf = v2.Compose(augment.preprocess(cfg))
    n = len(batch["uri"])
    out_img = np.zeros((n, cfg.channels, cfg.size, cfg.size), np.uint8)
    out_masks = np.zeros((n, 2, cfg.size, cfg.size), np.uint16) if masks else None
    out_cov = np.zeros((n, cfg.size, cfg.size), np.uint8) if coverage else None
    cov_ok = np.zeros(n, bool)
    ok = np.zeros(n, bool)
    err = np.full(n, "", dtype=object)
    boxes_out = np.empty(n, dtype=object)
    for i in range(n):
        boxes_out[i] = np.zeros((0, 4), np.float32)
        sample, err[i] = _read_sample(batch, i, cfg, detection, masks, coverage)
        if sample is None:
            continue
        if coverage and sample["covered"] is None:
            del sample["covered"]
        res = tf(sample)
        out_img[i] = (res["image"].clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).numpy()
        if masks:
            out_masks[i] = res["masks"].as_subclass(torch.Tensor).numpy().astype(np.uint16)
        if "covered" in res:
            out_cov[i] = res["covered"].as_subclass(torch.Tensor).numpy()[0]
            cov_ok[i] = True
        ok[i] = True
        if detection:
            boxes_out[i] = res["boxes"].as_subclass(torch.Tensor).numpy().astype(np.float32).reshape(-1, 4)
    out = {"image": out_img, "ok": ok, "error": err.astype(str), "row": batch["row"].astype(np.int64)}
    if detection:
        out["boxes_flat"] = np.array([b.ravel().tolist() for b in boxes_out] + [[]], dtype=object)[:-1]
    if masks:
        out["masks"] = out_masks
    if coverage:
        out["covered"], out["covered_ok"] = out_cov, cov_ok
    return out


def build_cache(
    rows: pa.Table, cfg: DataConfig, *, detection: bool = False, masks: bool = False, coverage: bool = False
):
    """Decode, equalise (multi-stack) and resize every row once with Ray Data tasks → an
    :class:`msc_ray.engine.Cache` (uint8, in this process's memory; put it in Ray's object store to
    share it). ``masks``: with each image's cell and nucleus instance masks (:func:`mask_uris`). Rows
    that cannot be read (image or mask) are left out and listed in ``Cache.errors``. ``coverage``: with
    the pixels cells cover where an image has a cell mask (``Cache.covered``; images without one stay,
    marked unknown in ``Cache.covered_ok``; no image with one: ``covered`` is None)."""

    from .engine import Cache

    keep = ["uri", "path", "row"] + (["boxes"] if detection else []) + (["stack"] if masks or coverage else [])
    src = rows.select(keep)
    step = block_rows(src.num_rows, cfg)
    ds = ordered_blocks([src.slice(i, step) for i in range(0, src.num_rows, step)] or [src]).map_batches(
        _cache_batch,
        fn_kwargs={"cfg": cfg, "detection": detection, "masks": masks, "coverage": coverage},
        batch_size=step,
        batch_format="numpy",
        num_cpus=1,
    )
    imgs, oks, errs, rws, bxs, msks, covs, cov_oks = [], [], [], [], [], [], [], []
    for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
        imgs.append(b["image"]), oks.append(b["ok"]), errs.append(b["error"]), rws.append(b["row"])
        if masks:
            msks.append(b["masks"])
        if coverage:
            covs.append(b["covered"]), cov_oks.append(b["covered_ok"])
        if detection:
            bxs.extend(np.asarray(v, np.float32).reshape(-1, 4) for v in b["boxes_flat"])
    shape = (0, cfg.channels, cfg.size, cfg.size)
    image = np.concatenate(imgs) if imgs else np.zeros(shape, np.uint8)
    ok = np.concatenate(oks) if oks else np.zeros(0, bool)
    row = np.concatenate(rws) if rws else np.zeros(0, np.int64)
    error = np.concatenate(errs) if errs else np.zeros(0, str)
    by_row = {int(r): i for i, r in enumerate(rows.column("row").to_numpy())}
    pos = np.array([by_row[int(r)] for r in row], np.int64)
    good = np.flatnonzero(ok)
    conf = _confluence_column(rows)
    cov_ok = np.concatenate(cov_oks)[good] if coverage and cov_oks else None
    if cov_ok is not None and not cov_ok.any():
        cov_ok = None
    return Cache(
        images=np.ascontiguousarray(image[good]),
        labels=rows.column("label").to_numpy().astype(np.int64)[pos[good]],
        rows=row[good],
        folds=rows.column("fold").to_numpy().astype(np.int64)[pos[good]],
        keys=[rows.column("path")[int(p)].as_py() for p in pos[good]],
        confluence=conf[pos[good]],
        boxes=[bxs[i] for i in good] if detection else None,
        errors=tuple(str(e) for e in error[~ok]),
        masks=np.ascontiguousarray(np.concatenate(msks)[good]) if masks and msks else None,
        covered=np.ascontiguousarray(np.concatenate(covs)[good]) if cov_ok is not None else None,
        covered_ok=cov_ok,
    )


def _confluence_column(rows: pa.Table) -> np.ndarray:
    """float32 measured confluence per row; NaN where the corpus has none."""
    if "confluence" not in rows.column_names:
        return np.full(rows.num_rows, np.nan, np.float32)
    return np.asarray(rows.column("confluence").to_numpy(zero_copy_only=False), np.float64).astype(np.float32)
