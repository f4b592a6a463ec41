"""Backbone × fold search for the confluence classifier on Ray Tune.

Three phases in two Tune experiments under ``RUN/`` (``search``, ``final``), each resumable with
``Tuner.restore``:

Nested evaluation: for outer fold k, fold k is the test part (Table 1's figures; nothing is
trained, stopped, selected or calibrated on it), fold k+1 is the inner validation part (early
stopping, ASHA, backbone choice, temperature), the other folds train. Where the search holds one
configuration per fold there is nothing to choose, and ``inner_fold="train"`` lets fold k+1 train too
(:mod:`.crossfit`): each fold's model runs its whole schedule on every fold but k, and fold k is calibrated
with a temperature fitted on the other folds' outer outputs.

1. ``search``: one trial per (backbone, outer fold, sampled learning rate and weight decay). AMSGrad
   Adam (its ``weight_decay`` is L2 regularisation), warm-up then cosine learning rate, class-weighted
   cross-entropy plus a confluence regression output where the corpus carries measured confluence,
   patience on inner-validation micro ROC-AUC, and ASHA across the trials *of the same fold*.
2. ``final``: the winning configuration on every fold without ASHA (reusing search trials that ran it
   to the end), so the winner's row is complete; its outer-fold outputs give the ROC/PR curves and the
   confusion matrix, its inner-validation outputs the temperature.
3. the export: the winner trained on all images over the whole schedule (``max_epochs``, final
   weights: nothing is left to pick an epoch on): the artifact scoring loads (one forward pass per
   image, where a five-model fold ensemble would cost five). It is the fold -1 trial of the ``final``
   experiment, queued first beside the winner's unfinished folds — of the ``search`` experiment where
   the winner is known before it runs (one configuration per fold). A run that an earlier version
   left with a ``RUN/export`` experiment of its own finishes it there (:func:`.export.export_phase`).

Images are decoded and resized once, before any trial (Ray Data tasks → :class:`engine.Cache`), and
reach trials through Ray's object store; a trial (:func:`classifier_trial`, one config dict) is a
thin wrapper around :func:`engine.train_one_epoch` and :func:`engine.evaluate` and needs no data
tasks while it trains, so trials only ask for their own CPUs (and GPU share) and queue for them.

Modules: :mod:`.job` (options, the stack's defaults, the caches), :mod:`.trial` (the trainable),
:mod:`.experiment` (one Tune experiment, ASHA per fold), :mod:`.search`, :mod:`.final` (with Table 1),
:mod:`.export` (with the temperature and the artifact), :mod:`.crossfit` (cross-fitted calibration) and
:mod:`.run` (the phases in order).
"""

from .crossfit import cross_fit, fold_temperatures
from .experiment import SNAPSHOT_WARNING, SearchOutcome, TrialResult, _run_experiment, _space, fit_tuner, per_fold_asha
from .export import calibration, export_phase
from .final import TABLE_KEYS, build_table, final_phase
from .job import AUGMENT_ON, INNER_FOLD, METRIC, STACK_DEFAULTS, StackDefaults, TuneJobConfig, absolute, build_caches
from .run import run_search
from .search import known_winner, pick_winner, search_phase
from .trial import ClassifierRun, classifier_trial

__all__ = [
    "AUGMENT_ON",
    "INNER_FOLD",
    "METRIC",
    "SNAPSHOT_WARNING",
    "STACK_DEFAULTS",
    "StackDefaults",
    "TABLE_KEYS",
    "ClassifierRun",
    "SearchOutcome",
    "TrialResult",
    "TuneJobConfig",
    "_run_experiment",
    "_space",
    "absolute",
    "build_caches",
    "build_table",
    "calibration",
    "classifier_trial",
    "cross_fit",
    "export_phase",
    "final_phase",
    "fit_tuner",
    "fold_temperatures",
    "known_winner",
    "per_fold_asha",
    "pick_winner",
    "run_search",
    "search_phase",
]
