"""Shared fixtures: small synthetic corpora, one local Ray session, one real S3 server (SeaweedFS)."""

from __future__ import annotations

import os
import shutil

import pytest

from msc_ray import synth, use_local_ray_env


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    """Both stacks, 24 images each, 64 px PNG, with truth rows."""
    out = tmp_path_factory.mktemp("corpus")
    rows = synth.synthesize(out, synth.SynthConfig(n=24, size=64, seed=3, abnormal_fraction=0.5))
    return out, rows


@pytest.fixture()
def corpus_copy(small_corpus, tmp_path):
    """A private copy of the small corpus that a test may damage."""
    src, rows = small_corpus
    dst = tmp_path / "corpus"
    shutil.copytree(src, dst)
    return dst, rows


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A SeaweedFS S3 server on 127.0.0.1 with its credentials exported as AWS_* for the session."""
    from msc_ray.s3local import LocalS3

    server = LocalS3(tmp_path_factory.mktemp("s3")).start()
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    yield server
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture(scope="session")
def ray_session(request):
    """One local Ray for the whole suite, started after the S3 server so workers inherit its AWS_*
    (without SeaweedFS installed — a GPU machine running only ``-m gpu`` — Ray starts alone and the
    tests that need the server fail on their own)."""
    import ray

    from msc_ray.s3local import weed_binary

    try:
        weed_binary()
    except FileNotFoundError:
        pass
    else:
        request.getfixturevalue("s3_server")

    use_local_ray_env()  # as the CLI's own local Ray: training runs end as soon as their workers do
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True, configure_logging=False)
    yield ray
    ray.shutdown()


def upload_dir(client, local, bucket: str, prefix: str) -> int:
    """Upload every file under ``local`` to ``s3://bucket/prefix/``; returns the count."""
    n = 0
    for p in sorted(local.rglob("*")):
        if p.is_file():
            client.upload_file(str(p), bucket, f"{prefix}/{p.relative_to(local).as_posix()}")
            n += 1
    return n
