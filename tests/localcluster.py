"""A Ray cluster of separate node processes on this machine, started as an operator would: ``ray start
--head`` (no CPUs: it only schedules, and runs the dashboard and job server) and ``ray start
--address`` per worker node, with token authentication on. Jobs reach it through ``ray job submit``."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

from msc_ray.s3local import _free_ports

RAY = str(Path(sys.executable).with_name("ray"))


def submit_job(cmd: list[str], env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    """``ray job submit`` (``cmd``), tried again while the job server answers before its agent accepts
    jobs ("No available agent to submit job": a fresh head's dashboard is up a little before its agent)."""
    for _ in range(30):
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        if "No available agent" not in res.stdout + res.stderr:
            break
        time.sleep(2)
    return res


class LocalCluster:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        token = self.root / "auth_token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        # every node and every client reads the token from this file; nothing else reaches the job API
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("RAY_")},
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token),
        }
        self.gcs_port, self.dashboard_port = _free_ports(2)
        self.workers: list[int] = []  # node manager port of each worker node

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _node_ports(self) -> list[str]:
        # one set per node: nodes on one host must not share the agents' and metrics ports
        a, b, c, d, e = _free_ports(5)
        return [
            f"--dashboard-agent-listen-port={a}",
            f"--dashboard-agent-grpc-port={b}",
            f"--metrics-export-port={c}",
            f"--runtime-env-agent-port={d}",
            f"--node-manager-port={e}",
        ]

    def _ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([RAY, *args], env=self.env, capture_output=True, text=True, timeout=timeout)

    def start_head(self) -> None:
        res = self._ray(
            "start",
            "--head",
            "--num-cpus=0",
            f"--port={self.gcs_port}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--temp-dir={self.root / 'ray'}",
            "--disable-usage-stats",
            *self._node_ports(),
        )
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]

    def add_worker(self, cpus: int = 2) -> None:
        ports = self._node_ports()
        res = self._ray(
            "start", f"--address=127.0.0.1:{self.gcs_port}", f"--num-cpus={cpus}", "--disable-usage-stats", *ports
        )
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
        self.workers.append(int(ports[-1].split("=")[1]))

    def wait_for_nodes(self, n: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.alive_nodes() >= n:
                return
            time.sleep(1)
        raise TimeoutError(f"{n} nodes not up after {timeout}s")

    def _state(self, code: str) -> str:
        res = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr[-2000:]
        return res.stdout

    def alive_nodes(self) -> int:
        code = (
            "from ray.util.state import list_nodes\n"
            f"print(sum(n.state == 'ALIVE' for n in list_nodes(address={self.dashboard!r})))"
        )
        return int(self._state(code).strip().splitlines()[-1])

    def actors(self, class_name: str) -> list[dict]:
        code = (
            "import json\nfrom ray.util.state import list_actors\n"
            f"a = list_actors(address={self.dashboard!r}, filters=[('class_name', '=', {class_name!r})], detail=True)\n"
            "print(json.dumps([{'node_id': x.node_id, 'state': x.state} for x in a]))"
        )
        return json.loads(self._state(code).strip().splitlines()[-1])

    def submit(self, args: list[str], *, wait: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
        """``ray job submit`` of ``python ARGS`` (the job's driver runs on the head)."""
        extra = [] if wait else ["--no-wait"]
        cmd = [RAY, "job", "submit", f"--address={self.dashboard}", *extra, "--", sys.executable, *args]
        return submit_job(cmd, self.env, timeout)

    def job_status(self, job_id: str) -> str:
        code = (
            "from ray.job_submission import JobSubmissionClient\n"
            f"print(JobSubmissionClient({self.dashboard!r}).get_job_status({job_id!r}).value)"
        )
        return self._state(code).strip().splitlines()[-1]

    def wait_job(self, job_id: str, timeout: float = 600) -> tuple[str, str]:
        """Wait for a job submitted with ``wait=False`` to end; returns its final status and its logs."""
        deadline = time.monotonic() + timeout
        while (status := self.job_status(job_id)) in ("PENDING", "RUNNING") and time.monotonic() < deadline:
            time.sleep(2)
        return status, self.job_logs(job_id)

    def job_logs(self, job_id: str) -> str:
        """The job's driver output, without the raylet lines Ray streams into it."""
        out = self._ray("job", "logs", f"--address={self.dashboard}", job_id).stdout
        return "\n".join(ln for ln in out.splitlines() if "(raylet)" not in ln and "[state-dump]" not in ln)

    def kill_worker(self, index: int) -> int:
        """SIGKILL a worker node's raylet (its workers and agents die with it); returns its pid."""
        (raylet,) = processes([f"--node_manager_port={self.workers[index]}"])
        raylet.send_signal(signal.SIGKILL)
        return raylet.pid

    def stop(self) -> None:
        """Stop this cluster's processes only (``ray stop`` would stop every Ray on the machine): every
        node of it runs in the head's temp folder."""
        kill_processes_naming(str(self.root / "ray"))


def processes(exact: list[str], within: list[str] = ()) -> list:
    """Processes (psutil) with an argument equal to one of ``exact`` or containing one of ``within``."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        args = proc.info["cmdline"] or []
        if proc.pid != os.getpid() and any(a in exact or any(w in a for w in within) for a in args):
            found.append(proc)
    return found


def kill_processes_naming(folder: str) -> None:
    """SIGKILL every process (and its children) with an argument containing ``folder``: one Ray's nodes,
    workers and agents, all started with its temp folder, and nothing of another Ray on this machine."""
    import psutil

    procs = processes([], [folder])
    for proc in list(procs):
        try:
            procs += proc.children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
