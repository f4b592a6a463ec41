"""The search's job: its options (with the stack's defaults) and the decode-once caches trials read."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import NamedTuple

from .. import check_views, data, engine, models, storage
from ..config import DataConfig

log = logging.getLogger(__name__)


METRIC = "val_auc"


AUGMENT_ON = ("auto", "cpu", "device")


INNER_FOLD = ("validate", "train")


class StackDefaults(NamedTuple):
    """What a job takes from its stack where it leaves a setting at 0 (the coverage weight: at None)."""

    size: int
    epochs: int
    patience: int  # 0: the whole schedule
    coverage_weight: float


# Single-stack: 64 px holds confluence (96 px gained nothing, at twice the cost). Multi-stack: its cells are
# one-pixel edges that 64 px loses — the compact CNN, 30 epochs, read 400 new-vessel images at 0.82 / 0.76
# from 64 px against 0.91 / 0.89 from 128 px (800 / 480 training images, development corpora) — and learn
# late: 60 epochs read new vessels at 0.895 against 0.880 for 30 (scripts/quality.py), and a trial that runs
# its whole schedule and keeps its best inner-validation epoch read them 2.2 points better on average than
# one that patience 6 stopped (eight fold models of three development corpora; a 45-epoch schedule run to
# its end was worse than both). Patience 0 in this table: the whole schedule (no early stop; the best epoch
# is still the inner validation's). Coverage weight: 3 single-stack; 16 multi-stack, whose faint cells the
# compact CNN learns to cover better with more weight on the map: on six fold models of two development
# corpora, new vessels 0.867 against 0.849 at 3 (0.865 at 8), their confluence MAE 1.8 points against 2.2.
# See README, "Why these defaults", and docs/measurements.md.
STACK_DEFAULTS = {"sstack": StackDefaults(64, 25, 6, 3.0), "mstack": StackDefaults(128, 60, 0, 16.0)}


@dataclass(frozen=True)
class TuneJobConfig:
    manifest: str  # manifest URI (the CLI indexes a corpus into RUN/manifest.parquet first)
    out: str  # run folder: a local path (a shared mount on a cluster) or s3://bucket/prefix
    stack: str = "sstack"
    backbones: tuple[str, ...] = ("coverage_unet", "compact_cnn")
    max_epochs: int = 0  # 0: by stack (STACK_DEFAULTS), set when the config is made
    patience: int = 0  # 0: by stack (STACK_DEFAULTS): 6 single-stack, the whole schedule multi-stack
    # no best epoch is kept and no trial stops before this epoch (0: half of max_epochs): mid-schedule, at
    # the peak learning rate, inner-validation accuracy swings from epoch to epoch (one fold: 0.71 0.88 0.86
    # 0.47 0.71), so a best epoch picked there is a lucky draw and patience ends the trial on a dip long
    # before the cosine decay settles the weights (see README, "Why these defaults")
    min_epochs: int = 0
    # what the fold after each outer fold does. "validate" (default): it is the inner validation part —
    # backbone choice, ASHA, the best epoch and the temperature are read on it, and three of five folds
    # train. "train": only for a search with one configuration per fold (one backbone, one learning rate
    # and weight decay: nothing to choose), where it trains too, so each fold's model learns from four of
    # five folds, runs its whole schedule and keeps its last (averaged) weights; each outer fold is then
    # calibrated with a temperature fitted on the other folds' outer outputs (tune.crossfit), which never
    # see it. Multi-stack learns from more images more than from anything else tried (README)
    inner_fold: str = "validate"
    warmup_epochs: int = 2
    confluence_head: bool = True  # a regression output where the corpus carries measured confluence
    # coverage supervision: where the corpus has cell masks (masks/<stack>/, as the synthetic corpus and
    # segmentation exports have), backbones that support it (the compact CNN) also learn a coverage map
    # of their last features against the covered pixels; training only — the exported model leaves it out
    coverage: bool = True
    # the coverage term's weight beside the band and confluence losses; None: by stack (STACK_DEFAULTS)
    coverage_weight: float | None = None
    # test-time views (engine.view_mean): the temperature, Table 1 and the exported model average the
    # outputs over the image's quarter turns and mirror images (8), its quarter turns (4) or take it as
    # it is (1); the per-epoch validation (early stopping, ASHA) takes one view
    views: int = 8
    # the weights judged and exported: 0 the model's own after each step; > 0 their exponential moving
    # average with a time constant of this many epochs of steps (engine.weight_average). The compact CNN's
    # inner-validation accuracy swings from epoch to epoch at 8-30 steps an epoch; on development corpora
    # (two folds per stack, 200 new-vessel images each) the average over 2 epochs read new vessels at
    # 0.825 / 0.795 against 0.770 / 0.740 (multi-stack) and 0.955 / 0.940 against 0.915 / 0.940
    # (single-stack), confluence MAE lower on all four (README, "Weight averaging")
    average_epochs: float = 2.0
    samples: int = 2  # hyper-parameter samples per (backbone, fold)
    lr_min: float = 1e-3
    lr_max: float = 3e-3
    wd_min: float = 1e-6
    wd_max: float = 1e-3
    batch_size: int = 32
    # input side; 0: by stack (STACK_DEFAULTS): confluence is a low-frequency property and single-stack
    # images hold it at 64 px, multi-stack cells are thin, faint edges that vanish there (see README)
    size: int = 0
    channels: int = 3
    dropout: float = 0.5
    pretrained: str = "auto"  # auto | none | path to a state dict
    asha: bool = True
    grace_period: int = 4
    reduction_factor: int = 2
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent: int = 0  # 0: no limit; trials queue for their resources
    seed: int = 0
    endpoint_url: str | None = None
    verbose: int = 1  # Tune's console output: 0 silent, 1 status tables
    # a trial checkpoints when it ends and otherwise at most this often (seconds of its own time; 0: after
    # every epoch). Every checkpoint forces a snapshot of the experiment's state: with 3-second CPU epochs
    # checkpointed each epoch, Tune snapshotted several times in 5 s and warned so 250 times in one
    # quality.py run, and every epoch's weights went to the run folder (S3 included). A resumed trial
    # repeats at most this much of its work.
    checkpoint_every_s: float = 30.0
    # where each training batch is augmented: "cpu" (one image at a time, torchvision's transforms),
    # "device" (whole batches on the trial's device, augment.BatchAugment) or "auto" (device on a GPU)
    augment_on: str = "auto"
    # arithmetic of the classifier's forward passes: "bf16" (bfloat16 autocast), "fp32", or "auto" —
    # bf16 on a GPU and on a CPU that does it in hardware (engine.use_bf16: half the time per step)
    precision: str = "auto"

    def __post_init__(self) -> None:
        # the stack's measured defaults where the caller left size, epochs or patience at 0 and the coverage
        # weight at None (the CLI's defaults), so every saved config, trial and artifact holds the values used
        size, epochs, patience, coverage_weight = STACK_DEFAULTS.get(self.stack, STACK_DEFAULTS["sstack"])
        if self.size == 0:
            object.__setattr__(self, "size", size)
        if self.max_epochs == 0:
            object.__setattr__(self, "max_epochs", epochs)
        if self.patience == 0:  # the stack's, or the whole schedule where that is 0
            object.__setattr__(self, "patience", patience or self.max_epochs)
        if self.coverage_weight is None:
            object.__setattr__(self, "coverage_weight", coverage_weight)

    def validate(self, classes_by_stack: dict[str, list[str]]) -> None:
        """Every option, then the stack against the manifest's."""
        self.check_options()
        self.check_stack(classes_by_stack)

    def check_stack(self, classes_by_stack: dict[str, list[str]]) -> None:
        """The stack against the manifest's (what only an indexed corpus tells)."""
        if self.stack not in classes_by_stack:
            raise ValueError(f"--stack {self.stack}: the manifest has {', '.join(classes_by_stack) or 'no'} stacks")

    def check_options(self) -> None:
        """What needs no manifest: the CLI checks it before it indexes a corpus into ``--out``, so a wrong
        option is a one-line error that writes nothing."""
        for b in self.backbones:
            models.backbone(b)
        if self.coverage_weight < 0:
            raise ValueError(f"--coverage-weight {self.coverage_weight}: must be at least 0")
        if self.average_epochs < 0:
            raise ValueError(f"--average-epochs {self.average_epochs}: must be at least 0")
        if self.max_epochs < 1 or self.patience < 1 or self.samples < 1:
            raise ValueError("--max-epochs, --patience and --samples must be at least 1")
        if self.inner_fold not in INNER_FOLD:
            raise ValueError(f"--inner-fold {self.inner_fold}: choose one of {', '.join(INNER_FOLD)}")
        if self.inner_fold == "train" and not self.one_configuration:
            raise ValueError(
                "--inner-fold train: only for a search with one configuration per fold (one --backbones, one "
                "--lr and one --weight-decay value); a choice needs the inner validation fold"
            )
        if self.augment_on not in AUGMENT_ON:
            raise ValueError(f"--augment-on {self.augment_on}: choose one of {', '.join(AUGMENT_ON)}")
        check_views(self.views, f"--views {self.views}")
        engine.check_precision(self.precision)
        if self.pretrained_is_path and models.is_artifact(self.pretrained):
            self._check_transfer()

    @property
    def sampled(self) -> bool:
        """Whether the search samples a learning rate or weight decay (else each is one fixed value)."""
        return self.lr_max > self.lr_min or self.wd_max > self.wd_min

    @property
    def one_configuration(self) -> bool:
        """Whether the search holds one configuration per fold: one backbone, nothing sampled."""
        return len(self.backbones) == 1 and not self.sampled

    @property
    def cross_fitted(self) -> bool:
        """Whether the inner fold trains and each outer fold's temperature comes from the other folds."""
        return self.inner_fold == "train"

    @property
    def pretrained_is_path(self) -> bool:
        """Whether ``pretrained`` names a file or artifact rather than ``auto`` / ``none``."""
        return self.pretrained not in ("auto", "none", "")

    def _check_transfer(self) -> None:
        """An artifact to start from (``--pretrained``) is read before any trial starts: every backbone of
        the search must be the artifact's."""
        config = models.read_config(self.pretrained, self.endpoint_url)
        if config.get("kind") != "classifier":
            raise ValueError(f"--pretrained {self.pretrained}: a {config.get('kind')} artifact, not a classifier")
        other = [b for b in self.backbones if b != config.get("architecture")]
        if other:
            raise ValueError(
                f"--pretrained {self.pretrained}: a {config.get('architecture')} model; the search's "
                f"backbones must all be {config.get('architecture')} (not {', '.join(other)})"
            )


def _data_config(job: TuneJobConfig, backbone: str, pretrained: bool) -> DataConfig:
    return DataConfig(
        size=models.input_size(backbone, job.size, pretrained),
        channels=job.channels,
        equalize=job.stack == "mstack",
        seed=job.seed,
        endpoint_url=job.endpoint_url,
    )


def build_caches(job: TuneJobConfig, manifest) -> dict[int, engine.Cache]:
    """Decode every image of the stack once per input size the backbones need (Ray Data tasks),
    before any trial starts; trials get the caches through Ray's object store. A size that a backbone
    with a coverage head trains at also keeps the covered pixels (:func:`_has_cell_masks`)."""
    rows = data.select(manifest, stack=job.stack)
    configs: dict[int, DataConfig] = {}
    coverage_sizes: set[int] = set()
    for name in job.backbones:
        dcfg = _data_config(job, name, models.imagenet_sized(models.resolve_pretrained(name, job.pretrained)))
        configs.setdefault(dcfg.size, dcfg)
        if job.coverage and models.supports_coverage(name):
            coverage_sizes.add(dcfg.size)
    if coverage_sizes and not _has_cell_masks(job, rows):
        coverage_sizes = set()
    caches: dict[int, engine.Cache] = {}
    for size, dcfg in configs.items():
        coverage = size in coverage_sizes
        caches[size] = c = data.build_cache(rows, dcfg, coverage=coverage)
        for e in c.errors:
            log.warning("left out: %s", e)
        if coverage:
            known = int(c.covered_ok.sum()) if c.covered_ok is not None else 0
            log.info("coverage supervision at %d px: cell masks for %d of %d images", size, known, len(c))
    return caches


def _has_cell_masks(job: TuneJobConfig, rows) -> bool:
    """Whether the corpus has a cell mask for its first image: a corpus without masks costs one read."""
    first = rows.slice(0, 1).to_pylist()[0]
    return storage.exists(data.mask_uris(first["uri"], first["path"], first["stack"])[0], job.endpoint_url)


def absolute(job: TuneJobConfig) -> TuneJobConfig:
    """Local paths made absolute: trials run in their own working folders."""
    pretrained = storage.absolute(job.pretrained) if job.pretrained_is_path else job.pretrained
    return replace(job, manifest=storage.absolute(job.manifest), out=storage.absolute(job.out), pretrained=pretrained)
