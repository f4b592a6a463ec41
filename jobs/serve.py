"""Deploy the online service on a Ray cluster and return (see `msc-ray serve --help`).

Entrypoint for a Ray cluster::

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/serve.py \
        --classifier sstack=s3://plant/runs/sstack/artifact --detector s3://plant/runs/detector/artifact

The application keeps serving after the job ends (Serve applications outlive their driver); the page
is on the head at the --host/--port given (127.0.0.1:8000 by default: reach it through
`ray dashboard`-style port forwarding). `serve shutdown` stops it. For a declarative deployment use
`serve deploy deploy/serve.yaml` instead.
"""

import sys
from pathlib import Path

# the submitted working directory's package comes first, so the job runs the code that was submitted
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from msc_ray.cli import app  # noqa: E402

if __name__ == "__main__":
    app(["serve", "--detach", *sys.argv[1:]], prog_name="jobs/serve.py")
