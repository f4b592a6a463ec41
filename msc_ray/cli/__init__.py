"""The ``msc-ray`` command line: thin commands over one library function each.

A user error (bad option, unreadable input) prints one line ``error: ...`` and exits 1.
"""

from __future__ import annotations

from .common import UserError, app, main

# the commands register on ``app`` when their modules load, in the order ``msc-ray --help`` lists them
# isort: off
from . import corpus, train, score, serve, potency, quickstart  # noqa: F401
# isort: on

__all__ = ["UserError", "app", "main"]
