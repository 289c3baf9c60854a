"""A Ray head with a job server, started by ``ray start --head --block`` in its own process
group, temp dir and free ports, for the tests that submit jobs (tests/jobs/test_submit_e2e.py,
tests/jobs/test_object_storage.py). Stopping it ends exactly the processes it started, never
``ray stop`` (which would end every Ray on the machine)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update(
        RAY_AUTH_MODE="disabled",
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # `python`/`raytorch` of this venv
        PYTHONUNBUFFERED="1",
        **extra,
    )
    return env


class Head:
    """A Ray head with a job server, owned by this test module."""

    def __init__(self, temp_dir: Path):
        self.temp_dir = temp_dir
        self.port, self.dashboard_port = _free_port(), _free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.log = temp_dir / "ray-start.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 120) -> None:
        command = [
            str(BIN / "ray"), "start", "--head", "--block",
            f"--port={self.port}", "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
            "--num-cpus=2", "--disable-usage-stats", f"--temp-dir={self.temp_dir / 'ray'}",
            # Ports that default to fixed numbers, so that two heads on one machine don't collide.
            f"--ray-client-server-port={_free_port()}",
            f"--dashboard-agent-listen-port={_free_port()}",
        ]  # fmt: skip
        # A submitted job's relative storage_path goes here (raytorch.engine.io.fs.lasting_path).
        self.storage = self.temp_dir / "lasting"
        env = _env(RAYTORCH_STORAGE_PATH=str(self.storage))
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"`ray start` exited with {self.process.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.address}/api/version", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1)
        pytest.fail(
            f"the job server at {self.address} did not answer in {timeout_s:g} s:\n{self.tail()}"
        )

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def stop(self) -> None:
        """SIGTERM to `ray start --block` (it stops its Ray), then SIGKILL to any leftover."""
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        # Everything the head started (raylet, workers, job drivers) is in the session that
        # start_new_session opened, whose id is the head's pid; nothing else is.
        for pid in _session_members(self.process.pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def _session_members(sid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if os.getsid(int(entry.name)) == sid:
                    members.append(int(entry.name))
    return members
