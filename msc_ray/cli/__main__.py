"""``python -m msc_ray.cli``: the same as ``msc-ray``."""

from . import app

app()
