"""Backbone × fold search on Ray Tune (see `msc-ray tune --help`).

Entrypoint for a Ray cluster::

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/tune_classifier.py ARGS...

Connects to the cluster named by RAY_ADDRESS (set by `ray job submit`) and runs locally otherwise.
The options and the code are the CLI's: `python jobs/tune_classifier.py --help` lists them.
"""

import sys
from pathlib import Path

# the submitted working directory's package comes first, so the job runs the code that was submitted
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from msc_ray.cli import app  # noqa: E402

if __name__ == "__main__":
    app(["tune", *sys.argv[1:]], prog_name="jobs/tune_classifier.py")
