"""Shared fixtures: small synthetic corpora, made once per session."""

from __future__ import annotations

import pytest

from msc_ray import synth


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    """Both stacks, 24 images each, 64 px PNG, with truth rows."""
    out = tmp_path_factory.mktemp("corpus")
    rows = synth.synthesize(out, synth.SynthConfig(n=24, size=64, seed=3, abnormal_fraction=0.5))
    return out, rows
