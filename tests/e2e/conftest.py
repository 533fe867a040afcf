"""Fixtures for end-to-end tests: a real `kvwise serve` subprocess on a free loopback port.

`launch_server(*flags)` starts `python -m kvwise.serving.cli serve --host 127.0.0.1 --port P
--threads 1 ...`, waits for GET /health, and on exit sends SIGTERM (then SIGKILL if it hangs).
A test module sets `SERVER_ARGS` and uses the module-scoped `server` fixture, so each module pays
the model load once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT = 240.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, flags: list[str], api_key: Optional[str] = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.log = tempfile.NamedTemporaryFile("w+", prefix="kvwise-serve-", suffix=".log",
                                               delete=False)
        cmd = [sys.executable, "-m", "kvwise.serving.cli", "serve", "--host", "127.0.0.1",
               "--port", str(self.port), "--log-level", "warning", *flags]
        if api_key:
            cmd += ["--api-key", api_key]
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get(
            "PYTHONPATH", "")}
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=env)
        self._wait_healthy()

    def log_tail(self, n: int = 40) -> str:
        self.log.flush()
        return "".join(Path(self.log.name).read_text(errors="replace").splitlines(True)[-n:])

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n"
                                   f"{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"server not healthy after {STARTUP_TIMEOUT}s:\n{self.log_tail()}")

    def stats(self) -> dict:
        r = httpx.get(self.url + "/v1/kvwise/stats", headers=self.headers, timeout=30)
        r.raise_for_status()
        return r.json()

    def wait_drained(self, timeout: float = 30.0) -> dict:
        """Wait until no request runs or waits and no KV block is used (cached ones may stay)."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            if (stats["num_blocks_used"], stats["num_running"], stats["num_waiting"]) == (0, 0, 0):
                return stats
            if time.monotonic() > deadline:
                raise AssertionError(f"server did not drain: {stats}")
            time.sleep(0.05)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, wait for a graceful exit; SIGKILL after `timeout`. Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        return self.proc.returncode


@contextlib.contextmanager
def launch_server(*flags: str, api_key: Optional[str] = None) -> Iterator[ServerProcess]:
    server = ServerProcess(list(flags), api_key=api_key)
    try:
        yield server
    finally:
        server.stop()
        with contextlib.suppress(OSError):
            os.unlink(server.log.name)


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    """One server per test module, started with the module's SERVER_ARGS (and API_KEY)."""
    flags = getattr(request.module, "SERVER_ARGS", ["--threads", "1"])
    with launch_server(*flags, api_key=getattr(request.module, "API_KEY", None)) as s:
        yield s
