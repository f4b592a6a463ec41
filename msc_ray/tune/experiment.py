"""Running one Tune experiment (search, final or export) with ASHA within each outer fold, and collecting
its trials' results."""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import asdict, dataclass, field

from .. import signal_handlers_kept, storage
from .job import METRIC, TuneJobConfig
from .trial import classifier_trial

log = logging.getLogger(__name__)


def per_fold_asha(job: TuneJobConfig):
    """A scheduler that keeps one ASHA bracket per fold: trials are only compared within a fold."""
    from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler

    class PerFoldASHA(FIFOScheduler):
        def __init__(self):
            super().__init__()
            self._by_fold: dict[int, AsyncHyperBandScheduler] = {}
            self._metric, self._mode = METRIC, "max"

        def set_search_properties(self, metric, mode, **spec) -> bool:
            self._metric, self._mode = metric or self._metric, mode or self._mode
            return True

        def _asha(self, trial) -> AsyncHyperBandScheduler:
            fold = int(trial.config.get("fold", 0))
            if fold not in self._by_fold:
                self._by_fold[fold] = AsyncHyperBandScheduler(
                    time_attr="training_iteration",
                    metric=self._metric,
                    mode=self._mode,
                    max_t=job.max_epochs,
                    grace_period=min(job.grace_period, job.max_epochs),
                    reduction_factor=job.reduction_factor,
                )
            return self._by_fold[fold]

        def on_trial_add(self, controller, trial):
            self._asha(trial).on_trial_add(controller, trial)

        def on_trial_result(self, controller, trial, result) -> str:
            if METRIC not in result:
                return TrialScheduler.CONTINUE
            return self._asha(trial).on_trial_result(controller, trial, result)

        def on_trial_complete(self, controller, trial, result):
            if result and METRIC in result:
                self._asha(trial).on_trial_complete(controller, trial, result)

        def on_trial_remove(self, controller, trial):
            self._asha(trial).on_trial_remove(controller, trial)

        def debug_string(self) -> str:
            return f"ASHA per fold over {len(self._by_fold)} folds"

    return PerFoldASHA()


@dataclass
class TrialResult:
    backbone: str
    fold: int
    lr: float
    weight_decay: float
    epochs_run: int
    done_reason: str  # patience | max_epochs | epochs | "" (stopped by ASHA, or errored)
    best_val_auc: float = float("nan")  # inner validation: what selection sees
    best_epoch: int = 0
    test_auc: float = float("nan")  # outer fold: what Table 1 reports
    test_acc: float = float("nan")
    test_pr_auc: float = float("nan")
    test_ece_after: float = float("nan")
    test_ece_floor: float = float("nan")  # the ECE a calibrated model would show on that fold's images
    test_confluence_mae: float = float("nan")
    checkpoint: str | None = None
    error: str | None = None

    @property
    def complete(self) -> bool:
        return bool(self.done_reason)


@dataclass
class SearchOutcome:
    search: list[TrialResult]
    final: list[TrialResult]
    table: list[dict]
    winner: dict
    outputs: dict[str, str] = field(default_factory=dict)


def _resources(job: TuneJobConfig) -> dict:
    res = {"cpu": job.cpus_per_trial}
    if job.gpus_per_trial:
        res["gpu"] = job.gpus_per_trial
    return res


def _run_experiment(
    job: TuneJobConfig,
    name: str,
    param_space: dict,
    caches: dict,
    *,
    asha: bool,
    resume: bool,
    num_samples: int = 1,
    ranked: bool = True,
):
    """One resumable Tune experiment under ``RUN/name``. Trials ask for their own resources and
    queue for them (``--max-concurrent`` caps how many run at once; nothing reads the cluster's
    current size), and get the decoded images through Ray's object store (``tune.with_parameters``).
    ``ranked``: every trial reports the validation metric (not so where an export run takes part)."""
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    storage_path, fs = storage.ray_storage(job.out, job.endpoint_url)
    path = os.path.join(storage_path, name)
    trainable = tune.with_resources(tune.with_parameters(classifier_trial, caches=caches), _resources(job))
    if tune.Tuner.can_restore(path, storage_filesystem=fs):
        if not resume:
            where = storage.join(job.out, name)
            raise ValueError(f"{where} holds an earlier experiment: pass --resume to finish it, or use a new --out")
        log.info("resuming %s", storage.join(job.out, name))
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True, storage_filesystem=fs)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=METRIC if ranked else None,
                mode="max" if ranked else None,
                num_samples=num_samples,
                scheduler=per_fold_asha(job) if asha else None,
                # seeded sampling: the same job samples the same learning rates and weight decays
                # (the concurrency limit goes here: Tune ignores max_concurrent_trials for this generator)
                search_alg=BasicVariantGenerator(random_state=job.seed, max_concurrent=job.max_concurrent),
                trial_dirname_creator=lambda t: f"{t.config['backbone']}-fold{t.config['fold']}-{t.trial_id}",
                # a trial that ends hands its process to the next one (every trial asks for the same
                # resources): the next trial skips a process start and the torch import (~4 s on a CPU)
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=storage_path,
                storage_filesystem=fs,
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                failure_config=tune.FailureConfig(max_failures=1),
                verbose=job.verbose,
            ),
        )
    grid = fit_tuner(tuner, quiet=job.verbose == 0)
    # A Ctrl-C ends the fit and returns what it has: trials still running, or — with --max-concurrent the
    # generator makes trials only as slots free up — none at all for the rest of the space. So the ended
    # trials are counted against the trials the space makes, not against the grid returned.
    if grid.num_terminated + grid.num_errors < expected_trials(param_space, num_samples):
        raise ValueError(f"the {name} experiment was interrupted; finish it with --resume (same --out)")
    results = _collect(grid)
    if results and all(r.error for r in results):
        raise ValueError(f"every {name} trial failed; the first: {results[0].error}")
    return results


def expected_trials(param_space: dict, num_samples: int) -> int:
    """How many trials a finished experiment holds: every combination of the space's grid searches,
    ``num_samples`` times."""
    n = num_samples
    for value in param_space.values():
        if isinstance(value, dict) and set(value) == {"grid_search"}:
            n *= len(value["grid_search"])
    return n


def _first_line(error) -> str:
    """The trial's own exception as one line, ``Type: message`` (Tune wraps it in its own errors)."""
    cause = getattr(error, "cause", None) or error
    lines = [ln.strip() for ln in str(cause).strip().splitlines() if ln.strip()]
    if len(lines) > 1:  # a formatted traceback: the raised exception is its last "Type: message" line
        for ln in reversed(lines):
            head = ln.split(":")[0]
            if ":" in ln and head.replace(".", "").isidentifier() and not ln.startswith("File "):
                return ln
    msg = lines[-1] if lines else ""
    return f"{type(cause).__name__}: {msg}" if msg else type(cause).__name__


# Each trial keeps one checkpoint (``num_to_keep=1``), so Tune snapshots the experiment after every
# trial checkpoint (resume must not point at a deleted one) and warns that snapshots "may become a
# bottleneck" whenever two come within 5 s — which trials of one fold ending together do (six times in
# the suite's 6-trial search). The snapshot is a few small files; Tune's warning for a snapshot that takes
# over 30 s stays on, and a value the user sets is kept.
SNAPSHOT_WARNING = "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S"


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    """``os.environ`` with ``values`` for the duration of the block, restored after it."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def fit_tuner(tuner, *, quiet: bool):
    """``tuner.fit()`` without the forced-snapshot warning (:data:`SNAPSHOT_WARNING`); ``quiet``: with
    no console output at all. Tune's default console reporter prints the experiment's header and paths
    even at verbosity 0; its legacy reporter prints nothing there, so a silent fit selects it for the
    duration of the call.

    Tune turns the first Ctrl-C of a fit into "end this experiment" with a SIGINT handler it leaves
    installed when the fit returns: a Ctrl-C while the search picks its winner or starts its next phase
    would only end an experiment that is already over, and be lost. The handlers in place before the
    fit are put back after it (:func:`msc_ray.signal_handlers_kept`), so a Ctrl-C between experiments
    interrupts the run."""
    env = {} if SNAPSHOT_WARNING in os.environ else {SNAPSHOT_WARNING: "0"}
    if quiet:
        env["RAY_AIR_NEW_OUTPUT"] = "0"
    with _environment(env), signal_handlers_kept():
        return tuner.fit()


def _collect(grid) -> list[TrialResult]:
    out = []
    nan = float("nan")
    for r in grid:
        cfg, m = r.config, r.metrics or {}
        out.append(
            TrialResult(
                backbone=cfg["backbone"],
                fold=int(cfg["fold"]),
                lr=float(cfg["lr"]),
                weight_decay=float(cfg["weight_decay"]),
                epochs_run=int(m.get("epoch", 0)),
                done_reason=str(m.get("done_reason", "") or ""),
                best_val_auc=float(m.get("best_val_auc", nan)),
                best_epoch=int(m.get("best_epoch", 0)),
                test_auc=float(m.get("test_auc", nan)),
                test_acc=float(m.get("test_acc", nan)),
                test_pr_auc=float(m.get("test_pr_auc", nan)),
                test_ece_after=float(m.get("test_ece_after", nan)),
                test_ece_floor=float(m.get("test_ece_floor", nan)),
                test_confluence_mae=float(m.get("test_confluence_mae", nan)),
                checkpoint=r.checkpoint.path if r.checkpoint else None,
                error=_first_line(r.error) if r.error else None,
            )
        )
    return out


def _space(job: TuneJobConfig, phase: str, folds: int, classes: list[str], **fixed) -> dict:
    return {"job": asdict(job), "phase": phase, "folds": folds, "classes": classes, **fixed}
