"""Listing an archive (a local folder or an ``s3://`` prefix) and checking the report can be written."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

from .. import storage
from .config import ArchiveObject

# --------------------------------------------------------------------------------------------------
# Listing
# --------------------------------------------------------------------------------------------------


def _split_s3(uri: str) -> tuple[str, str]:
    rest = uri[len("s3://") :]
    bucket, _, prefix = rest.partition("/")
    return bucket, prefix.strip("/")


def iter_archive(archive: str, endpoint_url: str | None = None, exclude: str | None = None) -> Iterator[ArchiveObject]:
    """Every object under ``archive`` with what identifies its version, streamed (an S3 listing page or
    a folder at a time; S3 in key order, folders and names sorted locally). Objects under ``exclude``
    (the report, when it lies inside the archive) are left out."""
    prefix_out = exclude.rstrip("/") + "/" if exclude else None
    if storage.is_s3(archive):
        bucket, prefix = _split_s3(archive)
        client = storage.s3_client(endpoint_url)
        try:
            pages = client.get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=prefix + "/" if prefix else ""
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    key = obj["Key"]
                    uri = f"s3://{bucket}/{key}"
                    if key.endswith("/") or (prefix_out and uri.startswith(prefix_out)):
                        continue
                    rel = key[len(prefix) + 1 :] if prefix else key
                    yield ArchiveObject(uri, rel, int(obj["Size"]), obj["ETag"].strip('"'))
        except Exception as exc:  # botocore ClientError, EndpointConnectionError, NoCredentialsError, ...
            raise storage.StorageError(f"cannot list {archive}: {_s3_reason(exc)}") from None
        return
    root = os.path.abspath(archive)
    if not os.path.isdir(root):
        raise ValueError(f"{archive}: no such folder")
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fn in sorted(filenames):
            path = os.path.join(dirpath, fn)
            if prefix_out and path.startswith(prefix_out):
                continue
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            try:
                st = os.stat(path)
            except OSError as exc:  # a dangling link, a link loop: listed, it becomes an error row
                yield ArchiveObject(path, rel, -1, f"unreadable:{exc.errno}")
                continue
            yield ArchiveObject(path, rel, st.st_size, f"{st.st_size}:{st.st_mtime_ns}")


def list_archive(archive: str, endpoint_url: str | None = None, exclude: str | None = None) -> list[ArchiveObject]:
    """:func:`iter_archive` as a list sorted by key (for small archives and tests)."""
    return sorted(iter_archive(archive, endpoint_url, exclude), key=lambda o: o.key)


def _s3_reason(exc: BaseException) -> str:
    err = getattr(exc, "response", {}).get("Error", {}) if hasattr(exc, "response") else {}
    if err:
        return f"{err.get('Code', 'error')} ({err.get('Message', '')})".strip()
    return storage.describe_error(exc) or type(exc).__name__


def check_writable(out: str, endpoint_url: str | None = None) -> None:
    """Fail fast, before any work, when the report location cannot be written."""
    if storage.is_s3(out):
        bucket, _ = _split_s3(out)
        try:
            storage.s3_client(endpoint_url).head_bucket(Bucket=bucket)
        except Exception as exc:
            raise storage.StorageError(f"cannot write the report to {out}: {_s3_reason(exc)}") from None
    else:
        try:
            os.makedirs(out, exist_ok=True)
            probe = os.path.join(out, f".probe-{secrets.token_hex(4)}")
            open(probe, "wb").close()
            os.remove(probe)
        except OSError as exc:
            raise ValueError(f"--out {out}: not writable ({exc.strerror or exc})") from None
