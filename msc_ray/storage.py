"""Storage URIs: a local path or ``s3://bucket/prefix`` → a pyarrow filesystem and a path in it.

Credentials come from the standard AWS chain (environment, shared profiles, instance profile), as
boto3 resolves them; the endpoint of an S3-compatible store comes from ``endpoint_url`` or
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (pyarrow ignores those variables, so they are read here).
Nothing here logs or formats a credential; errors name the URI only.
"""

from __future__ import annotations

import functools
import os
import posixpath
from dataclasses import dataclass
from urllib.parse import urlparse

import pyarrow.fs as pafs


class StorageError(Exception):
    """The store cannot be reached or refused the request; the message names the URI, never a secret."""


@dataclass(frozen=True)
class Location:
    """Where a URI points: ``fs`` plus ``path`` inside it (``bucket/key`` for S3)."""

    fs: pafs.FileSystem
    path: str
    scheme: str  # "file" or "s3"

    def uri(self, path: str | None = None) -> str:
        p = self.path if path is None else path
        return f"s3://{p}" if self.scheme == "s3" else p

    def join(self, *parts: str) -> str:
        return posixpath.join(self.path, *parts) if parts else self.path


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def endpoint_from_env(endpoint_url: str | None = None) -> str | None:
    return endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def boto3_session():
    import boto3

    return boto3.session.Session(profile_name=os.environ.get("AWS_PROFILE") or None)


def s3_client(endpoint_url: str | None = None, *, connect_timeout: float = 5, max_attempts: int = 3):
    """A boto3 S3 client with standard retries and checksums only where a request needs them
    (S3-compatible stores reject boto3 ≥ 1.36's default trailing checksums)."""
    from botocore.config import Config

    cfg = Config(
        retries={"mode": "standard", "max_attempts": max_attempts},
        connect_timeout=connect_timeout,
        read_timeout=30,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        s3={"addressing_style": "path"},
    )
    session = boto3_session()
    return session.client(
        "s3",
        endpoint_url=endpoint_from_env(endpoint_url),
        config=cfg,
        region_name=session.region_name or "us-east-1",
    )


SDK_ATTEMPTS = 3  # the AWS SDK's own tries per request (standard retry mode), unless a caller retries itself


@functools.lru_cache(maxsize=8)
def s3_filesystem(endpoint_url: str | None = None, max_attempts: int = SDK_ATTEMPTS) -> pafs.S3FileSystem:
    """A pyarrow S3 filesystem, one per endpoint, number of SDK tries and process. Credentials come
    from the AWS SDK's own chain (environment, ``AWS_PROFILE`` and shared files, instance profile), so
    they refresh and never pass through msc-ray. ``max_attempts=1``: no SDK retries, for a caller with
    its own retry policy (retries would multiply: the SDK's backoff costs 1–2 s per dead read)."""
    endpoint = endpoint_from_env(endpoint_url)
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    kwargs: dict = {
        "connect_timeout": 5,
        "request_timeout": 30,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=max_attempts),
    }
    if region or endpoint:
        kwargs["region"] = region or "us-east-1"
    if endpoint:
        u = urlparse(endpoint)
        kwargs.update(endpoint_override=u.netloc or u.path, scheme=u.scheme or "https")
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str | os.PathLike, endpoint_url: str | None = None, max_attempts: int = SDK_ATTEMPTS) -> Location:
    """Turn a local path or an ``s3://bucket/prefix`` URI into a :class:`Location` (``max_attempts``:
    the SDK's tries per S3 request, :func:`s3_filesystem`)."""
    uri = str(uri)
    if is_s3(uri):
        rest = uri[len("s3://") :].strip("/")
        if not rest:
            raise ValueError(f"{uri}: an s3:// URI needs a bucket")
        return Location(s3_filesystem(endpoint_url, max_attempts), rest, "s3")
    if "://" in uri:
        raise ValueError(f"{uri}: only local paths and s3:// URIs are supported")
    return Location(pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri)), "file")


def read_bytes(uri: str, endpoint_url: str | None = None, max_attempts: int = SDK_ATTEMPTS) -> bytes:
    loc = resolve(uri, endpoint_url, max_attempts)
    with loc.fs.open_input_stream(loc.path) as fh:
        return fh.read()


def describe_error(exc: BaseException) -> str:
    """One line about a storage failure, with anything that looks like a secret left out."""
    msg = " ".join(str(exc).split())
    for var in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID"):
        val = os.environ.get(var)
        if val:
            msg = msg.replace(val, "***")
    return msg[:300]


def join(uri: str, *parts: str) -> str:
    """``uri`` / parts, for a local path or an ``s3://`` URI."""
    return posixpath.join(str(uri), *parts) if is_s3(uri) else os.path.join(str(uri), *parts)


def absolute(uri: str) -> str:
    """A local path made absolute (Ray workers and trials run in folders of their own); URIs as given."""
    return str(uri) if "://" in str(uri) else os.path.abspath(os.path.expanduser(str(uri)))


def ray_storage(uri: str, endpoint_url: str | None = None) -> tuple[str, pafs.FileSystem | None]:
    """``(storage_path, storage_filesystem)`` for Ray Tune's and Train's ``RunConfig``: a local path
    and no file system, or ``bucket/prefix`` and this project's S3 file system (which honours the
    endpoint URL; Ray's own URI resolution does not)."""
    if is_s3(uri):
        loc = resolve(uri, endpoint_url)
        return loc.path, loc.fs
    return absolute(uri), None


def read_checkpoint_file(run: str, checkpoint: str, name: str, endpoint_url: str | None = None) -> bytes | None:
    """A file of a Ray Tune/Train checkpoint of the run stored at ``run`` (``checkpoint`` is the path Ray
    reports in that storage: local, or ``bucket/key`` on S3); None when there is no such file."""
    fs = ray_storage(run, endpoint_url)[1] or pafs.LocalFileSystem()
    path = f"{checkpoint.rstrip('/')}/{name}"
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as fh:
        return fh.read()


def write_bytes(uri: str, data: bytes, endpoint_url: str | None = None) -> None:
    loc = resolve(uri, endpoint_url)
    try:
        if loc.scheme == "file":
            loc.fs.create_dir(posixpath.dirname(loc.path), recursive=True)
        with loc.fs.open_output_stream(loc.path) as fh:
            fh.write(data)
    except OSError as exc:
        raise StorageError(f"cannot write {uri}: {describe_error(exc)}") from None


def upload_dir(local_dir: str | os.PathLike, uri: str, endpoint_url: str | None = None) -> None:
    """Copy a local folder's files to ``uri`` (a no-op when ``uri`` is that folder)."""
    loc = resolve(uri, endpoint_url)
    if loc.scheme == "file" and os.path.realpath(loc.path) == os.path.realpath(local_dir):
        return
    try:
        pafs.copy_files(str(local_dir), loc.path, destination_filesystem=loc.fs)
    except OSError as exc:
        raise StorageError(f"cannot write {uri}: {describe_error(exc)}") from None


def check_writable(uri: str, endpoint_url: str | None = None) -> None:
    """Fail in seconds, naming ``uri``, when an output location cannot be written."""
    probe = join(uri, f"_write_probe_{os.getpid()}")
    write_bytes(probe, b"", endpoint_url)
    loc = resolve(probe, endpoint_url)
    try:
        loc.fs.delete_file(loc.path)
    except OSError:
        pass


def _exists_here(paths: list[str]) -> list[str]:
    return [p for p in paths if not os.path.exists(p)]


def ensure_shared(what: dict[str, str]) -> None:
    """On a Ray cluster of more than one node, every local path in ``what`` ({option: path}) must be
    seen by every node (a shared mount), else fail at start with one line: a trial, a Train worker or a
    scoring actor on another node would not find it (or would write where nobody reads). ``s3://``
    URIs pass. Each alive node is asked with a zero-CPU task pinned to it; a cluster whose only node
    keeps no CPUs for work (workers scale from zero) cannot be checked and is refused."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    local = {k: v for k, v in what.items() if v and not is_s3(v)}
    if not local or not ray.is_initialized():  # Ray not started yet: it will start here, one node
        return
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    here = ray.get_runtime_context().get_node_id()
    working = [n for n in nodes if n.get("Resources", {}).get("CPU", 0) > 0 or n.get("Resources", {}).get("GPU", 0) > 0]
    if len(nodes) <= 1 and working:
        return
    opt, path = next(iter(local.items()))
    advice = "give shared storage (s3://bucket/prefix, or a path on a mount every node has)"
    if not working:
        raise ValueError(f"{opt} {path}: a local path on a cluster whose work runs on nodes not started yet; {advice}")
    probe = ray.remote(num_cpus=0)(_exists_here)
    for n in nodes:
        if n["NodeID"] == here:
            continue
        missing = ray.get(
            probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
                list(local.values())
            )
        )
        if missing:
            opt = next(k for k, v in local.items() if v == missing[0])
            raise ValueError(
                f"{opt} {missing[0]}: not seen by node {n['NodeManagerAddress']} of this cluster; {advice}"
            )


def exists(uri: str, endpoint_url: str | None = None) -> bool:
    loc = resolve(uri, endpoint_url)
    return loc.fs.get_file_info(loc.path).type != pafs.FileType.NotFound
