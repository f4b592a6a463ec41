"""msc-ray: confluence classification, abnormal-cell detection and archive scoring for MSC cultures on Ray."""

import contextlib
import os
import signal
import threading

__version__ = "0.1.0"

#: Confluence bands (fraction of the image covered by cells), class 1..4.
BAND_EDGES = (0.0, 0.4, 0.6, 0.8, 1.0)
BAND_NAMES = ("1", "2", "3", "4")
STACKS = ("sstack", "mstack")
ABNORMAL_LABEL = "Flatten"
#: Test-time views a classifier's outputs (:func:`msc_ray.engine.view_mean`) and a U-Net's maps
#: (:meth:`msc_ray.models.UNetWatershed.maps`) can be averaged over.
VIEWS = (1, 4, 8)


def check_views(views: int, label: str) -> None:
    """A one-line ``ValueError`` that starts with ``label`` unless ``views`` is one of :data:`VIEWS`."""
    if views not in VIEWS:
        raise ValueError(f"{label}: choose one of {', '.join(map(str, VIEWS))}")


@contextlib.contextmanager
def signal_handlers_kept():
    """The SIGINT (and SIGUSR1) handlers as they were before the block, again after it. Tune's
    ``Tuner.fit`` and Ray Train's ``TorchTrainer.fit`` install Ctrl-C handlers that end *their* run and
    leave them installed when they return: a later Ctrl-C would only end a run that is over (or, for
    Train, exit with status 0) while the program went on. Main thread only: elsewhere nothing can
    install them."""
    names = [n for n in ("SIGINT", "SIGUSR1") if hasattr(signal, n)]
    main = threading.current_thread() is threading.main_thread()
    saved = {n: signal.getsignal(getattr(signal, n)) for n in names} if main else {}
    try:
        yield
    finally:
        for n, handler in saved.items():
            if handler is not None:
                signal.signal(getattr(signal, n), handler)


#: Ray Train's placement-group cleaner asks the State API every second whether the training controller is
#: alive, and warns each time it cannot: a Ray started here runs without the dashboard that serves that API,
#: so a training would print the same warning once a second from start to end.
TRAIN_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def quiet_worker_logs() -> None:
    """Ray's ``worker_process_setup_hook`` for a Ray the CLI starts itself (``msc_ray.cli.common``): only
    the cleaner's errors reach the console."""
    import logging

    logging.getLogger(TRAIN_CLEANER_LOGGER).setLevel(logging.ERROR)


#: Settings of a Ray that msc-ray starts on this machine itself (the CLI without an address, the
#: quickstart), read by Ray's processes when they start. Ray Train's controller looks at its workers every
#: 2 s by default, so each training run ends up to a few seconds after its last epoch; here every 0.25 s
#: (a look is one small actor call; a worker that misses one is only waited for longer).
LOCAL_RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"}


def use_local_ray_env() -> None:
    """Put :data:`LOCAL_RAY_ENV` into this process's environment, where not already set, before it starts
    a local Ray: the raylet and every worker it starts inherit it."""
    for key, value in LOCAL_RAY_ENV.items():
        os.environ.setdefault(key, value)
