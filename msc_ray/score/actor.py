"""The Ray Data stages: fetch and decode in CPU tasks, then the model actor (preprocessing, classifier,
detector, segmenter) that turns a batch of images into report columns."""

from __future__ import annotations

import json
import logging
import time
from pathlib import PurePosixPath

import numpy as np

from .. import images, inference, morphology, storage

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# Ray Data stages
# --------------------------------------------------------------------------------------------------


def stack_of(key: str, default: str | None) -> str | None:
    parts = PurePosixPath(key).parts
    for s in ("sstack", "mstack"):
        if s in parts[:-1]:
            return s
    return default


def _preprocess(
    batch: dict,
    *,
    cls_cfgs: dict[str, dict],
    endpoint_url: str | None,
    max_pixels: int,
    det_size: int | None = None,
    det_stacks: tuple[str, ...] = (),
    seg_size: int | None = None,
    seg_stacks: tuple[str, ...] = (),
    read_attempts: int = 4,
    retry_delay: float = 1.0,
    on_actor: bool = False,
) -> dict:
    """CPU task: read and decode a block of objects (``row``, ``uri``, ``key``, ``stack``) to uint8; a bad
    object becomes an error row. ``cls_cfgs``: each stack's classifier ``data`` config; the detector
    (``det_size``) serves the rows of ``det_stacks``, the segmenter those of ``seg_stacks``.

    Out: ``row``, ``stack``, ``ok``, ``error``, ``transient``, ``shape`` (each image's original (H, W)),
    ``use_det``, ``use_seg`` and the images, uint8 throughout (no float copy on the CPU): fitted to each
    model's input here (:func:`msc_ray.inference.fit_u8` — channels, equalisation, resize;
    ``image_<stack>`` per stack's classifier, ``det_image``, ``seg_image``; zeros in the rows a model
    does not take), or, with ``on_actor`` (a GPU actor: the resize is cheaper there), as decoded in
    ``image``: one ``(N, C, H, W)`` array when the block's images share a size, else one ``(C, H, W)``
    array per row.

    A store error (throttling, 5xx, timeout, connection) is retried ``read_attempts`` times with
    exponential backoff and then becomes a *transient* error row, scored again by the next run; once
    one object of the block has used up its retries, the rest get one try each (the store is down: no
    retry storm). A corrupt or unsupported image, or an object that is gone, is *permanent*."""
    n = len(batch["uri"])
    decoded, err, transient = _decode_block(batch, endpoint_url, max_pixels, read_attempts, retry_delay)
    ok = np.array([d is not None for d in decoded], bool)
    shape = np.array([d.shape[-2:] if d is not None else (0, 0) for d in decoded], np.int32).reshape(n, 2)
    stack = np.asarray(batch["stack"]).astype(str)
    use_det = ok & np.isin(stack, list(det_stacks)) if det_size else np.zeros(n, bool)
    use_seg = ok & np.isin(stack, list(seg_stacks)) if seg_size else np.zeros(n, bool)
    out = {
        "row": batch["row"],
        "stack": stack,
        "ok": ok,
        "error": err.astype(str),
        "transient": transient,
        "shape": shape,
        "use_det": use_det,
        "use_seg": use_seg,
    }
    if on_actor:
        out["image"] = _as_block(decoded)
        return out
    fits = [(f"image_{st}", inference.classifier_config(c), ok & (stack == st)) for st, c in cls_cfgs.items()]
    if det_size:
        fits.append(("det_image", inference.box_model_config(det_size), use_det))
    if seg_size:
        fits.append(("seg_image", inference.box_model_config(seg_size), use_seg))
    for col, cfg, take in fits:
        out[col] = _fitted(decoded, cfg, take)
    return out


def _decode_block(batch: dict, endpoint_url: str | None, max_pixels: int, read_attempts: int, retry_delay: float):
    """Each object of the block read (with retries) and decoded to uint8, or its error: ``(decoded,
    errors, transient)``; after one object has used up its retries the rest get one try each."""
    n = len(batch["uri"])
    decoded: list[np.ndarray | None] = [None] * n
    err = np.full(n, "", dtype=object)
    transient = np.zeros(n, bool)
    attempts = read_attempts
    for i in range(n):
        uri, key = str(batch["uri"][i]), str(batch["key"][i])
        try:
            decoded[i] = images.decode_u8(_read_retrying(uri, endpoint_url, attempts, retry_delay), key, max_pixels)
        except images.ImageError as exc:
            err[i] = str(exc)
        except Exception as exc:
            if _permanent(exc):  # deleted since it was listed, a dangling link or a link loop, a folder
                err[i] = f"{key}: cannot read ({exc.strerror or storage.describe_error(exc)})"
            else:  # the store failed for this object, after retries
                err[i] = f"{key}: cannot read ({storage.describe_error(exc)})"
                transient[i], attempts = True, 1
    return decoded, err, transient


def _fitted(decoded: list[np.ndarray | None], cfg, take: np.ndarray) -> np.ndarray:
    """``(N, C, S, S)`` uint8: the rows in ``take`` fitted to one model's input, zeros elsewhere."""
    import torch

    arr = np.zeros((len(decoded), cfg.channels, cfg.size, cfg.size), np.uint8)
    for i in np.flatnonzero(take):
        arr[i] = inference.fit_u8(torch.from_numpy(decoded[i])[None], cfg)[0].numpy()
    return arr


def _as_block(decoded: list[np.ndarray | None]) -> np.ndarray:
    """Decoded uint8 images (None for an error row) → one ``(N, C, H, W)`` array when they share a
    size, else an object array of ``(C, H, W)`` arrays; gray images get 3 channels when the block
    holds colour ones, error rows are zeros."""
    good = [d for d in decoded if d is not None]
    c = max((d.shape[0] for d in good), default=1)
    imgs = [None if d is None else (np.repeat(d, c, axis=0) if d.shape[0] < c else d) for d in decoded]
    shapes = {d.shape for d in imgs if d is not None}
    if len(shapes) <= 1:
        shp = shapes.pop() if shapes else (c, 1, 1)
        block = np.zeros((len(imgs), *shp), np.uint8)
        for i, d in enumerate(imgs):
            if d is not None:
                block[i] = d
        return block
    out = np.empty(len(imgs), dtype=object)
    for i, d in enumerate(imgs):
        out[i] = d if d is not None else np.zeros((c, 1, 1), np.uint8)
    return out


def _permanent(exc: BaseException) -> bool:
    """An error that reading again will not cure: the object is gone, or a local entry is not a
    readable file (dangling link, link loop, folder)."""
    import errno

    return isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError)) or (
        isinstance(exc, OSError) and exc.errno in (errno.ELOOP, errno.ENAMETOOLONG)
    )


def _read_retrying(uri: str, endpoint_url: str | None, attempts: int, delay: float) -> bytes:
    """``uri``'s bytes in at most ``attempts`` tries, ``delay`` doubling between them. These are the
    only retries: the SDK's own are off here (one request per try), so a dead store costs ``attempts``
    requests per object, not ``attempts`` times the SDK's three with its backoff (1–2 s each)."""
    from .. import data

    for attempt in range(attempts):
        try:
            return data.read_uri(uri, endpoint_url, max_attempts=1)
        except Exception as exc:
            if _permanent(exc) or attempt + 1 >= attempts:
                raise
            log.warning("retrying %s in %.1fs: %s", uri, delay * 2**attempt, storage.describe_error(exc))
            time.sleep(delay * 2**attempt)
    raise AssertionError("unreachable")


class ModelActor:
    """Holds each stack's classifier (and the detector, the segmenter) for the life of the actor
    (:mod:`msc_ray.inference`); turns uint8 image batches into predictions. The last preparation steps
    run here, on the actor's device (:class:`msc_ray.inference.ScoringInput`): to float, normalise,
    channels-last, and — for full-size images (``on_actor``) — channels, equalisation and resize. On a
    GPU the batch moves there as uint8 from pinned memory, the classifiers' weights are bfloat16 and
    the detector and segmenter run under bfloat16 autocast."""

    def __init__(
        self,
        classifiers: dict[str, str],
        detector: str | None,
        endpoint_url: str | None,
        segmenter: str | None = None,
        views: dict[str, int] | None = None,
    ):
        dev = inference.default_device()
        self.clfs = {st: inference.Classifier(uri, endpoint_url, dev) for st, uri in classifiers.items()}
        for st, n in (views or {}).items():  # the run's --views where it overrides the artifact's
            self.clfs[st].views = n
        if dev.type == "cuda":
            for clf in self.clfs.values():
                clf.to_bfloat16()
        self.clf_in = {st: inference.ScoringInput(clf.data_cfg, dev) for st, clf in self.clfs.items()}
        self.width = max(len(clf.classes) for clf in self.clfs.values())
        self.det = inference.Detector(detector, endpoint_url, dev) if detector else None
        self.seg = inference.Segmenter(segmenter, endpoint_url, dev) if segmenter else None
        self.det_in = inference.ScoringInput(inference.box_model_config(self.det.size), dev) if self.det else None
        self.seg_in = inference.ScoringInput(inference.box_model_config(self.seg.size), dev) if self.seg else None

    def __call__(self, batch: dict) -> dict:
        """Batch in (:func:`_preprocess`): ``row``, ``stack``, ``ok``, ``error``, ``transient``,
        ``shape``, ``use_det``, ``use_seg``, and ``image_<stack>`` [+ ``det_image``] [+ ``seg_image``]
        or full-size ``image`` for all. Batch out: ``row``, ``ok``, ``error``, ``probs`` (N, K)
        calibrated (K: the widest classifier's classes; a row uses its own classifier's first ones),
        ``boxes`` (JSON text per row: ``[[x1, y1, x2, y2, score], ...]`` in the original image's
        pixels), ``morph`` and ``cells`` (JSON text per row: the image's morphology and its cells,
        :func:`msc_ray.morphology.features` of the predicted masks)."""
        n = len(batch["row"])
        ok = np.asarray(batch["ok"], bool)
        stack = np.asarray(batch["stack"]).astype(str)
        shape = np.asarray(batch["shape"]).reshape(n, 2)
        probs = np.zeros((n, self.width), np.float32)
        conf = np.full(n, np.nan, np.float32)  # the confluence output (a fraction), when the model has one
        boxes = ["[]"] * n

        def rows(col: str, at: np.ndarray):
            arr = batch[col] if col in batch else batch["image"]
            return arr[at]

        for st, clf in self.clfs.items():
            idx = np.flatnonzero(ok & (stack == st))
            if len(idx):
                p, conf[idx] = clf(self.clf_in[st](rows(f"image_{st}", idx)))
                probs[idx, : p.shape[1]] = p
        didx = np.flatnonzero(np.asarray(batch["use_det"], bool))
        if self.det is not None and len(didx):
            x = self.det_in(rows("det_image", didx))
            scales = [np.array([w / self.det.size, h / self.det.size], np.float32) for h, w in shape[didx]]
            for i, bx in zip(didx, self.det(x, scales), strict=True):
                boxes[i] = json.dumps(bx)
        morph, cells = ["{}"] * n, ["[]"] * n
        sidx = np.flatnonzero(np.asarray(batch["use_seg"], bool))
        if self.seg is not None and len(sidx):
            maps = self.seg(self.seg_in(rows("seg_image", sidx)), list(shape[sidx]))
            for i, (cm, nm) in zip(sidx, maps, strict=True):
                found, img = morphology.features(cm.astype(np.int64), nm.astype(np.int64))
                morph[i], cells[i] = json.dumps(img), json.dumps(found)
        return {
            "row": batch["row"],
            "ok": ok,
            "error": batch["error"],
            "transient": batch["transient"],
            "probs": probs,
            "confluence": conf,
            "boxes": np.array(boxes, dtype=object).astype(str),
            "morph": np.array(morph, dtype=object).astype(str),
            "cells": np.array(cells, dtype=object).astype(str),
        }
