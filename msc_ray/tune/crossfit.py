"""Cross-fitted calibration (``--inner-fold train``): where a search holds one configuration per fold there
is nothing to choose on an inner validation fold, so it trains too, and each outer fold's temperature is
fitted on the other folds' outer outputs — outputs of models that never saw those images, and outputs that
hold none of this fold's images."""

from __future__ import annotations

import dataclasses

import numpy as np

from .. import engine, metrics
from .experiment import TrialResult
from .final import TABLE_KEYS
from .trial import outer_fold_figures


def fold_temperatures(parts: dict[int, dict], k: int) -> dict[int, float]:
    """Per outer fold, the temperature fitted on every *other* fold's outer outputs and labels
    (``parts``: fold → its ``test_outputs`` and ``test_labels``). A fold's own outputs play no part in its
    temperature."""
    if len(parts) < 2:
        raise ValueError("cross-fitted calibration needs at least two outer folds with outputs")
    temps = {}
    for fold in parts:
        others = [p for f, p in parts.items() if f != fold]
        logits = np.concatenate([p["test_outputs"][:, :k] for p in others])
        labels = np.concatenate([p["test_labels"] for p in others])
        temps[fold] = metrics.fit_temperature(logits, labels)
    return temps


def cross_fit(trials: list[TrialResult], parts: dict[int, dict], classes: list[str]):
    """Each fold's Table 1 figures with its cross-fitted temperature (:func:`fold_temperatures`), and
    its outer outputs with that temperature beside every row (``test_temperature``, as a validated fold
    saves its own). Returns (trials with their figures, fold → outputs)."""
    temps = fold_temperatures(parts, len(classes))
    done, outs = [], {}
    for t in trials:
        p = parts[t.fold]
        n = len(p["test_labels"])
        part = engine.Cache(
            images=np.zeros((n, 0, 0, 0), np.uint8),
            labels=np.asarray(p["test_labels"], np.int64),
            rows=np.asarray(p["test_rows"], np.int64),
            folds=np.full(n, t.fold, np.int64),
            keys=[""] * n,
            confluence=np.asarray(p["test_confluence"], np.float32),
        )
        figures = outer_fold_figures(p["test_outputs"], part, classes, temps[t.fold])
        outs[t.fold] = {**p, "test_temperature": figures["test_temperature"]}
        done.append(dataclasses.replace(t, **{f: figures[f] for f in TABLE_KEYS}))
    return done, outs
