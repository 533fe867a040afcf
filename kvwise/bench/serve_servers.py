"""The OpenAI-compatible servers `kvwise bench serve` loads, chosen by name from `SERVERS`.

A `ServerKind` says how to start one engine's server on a loopback port with a given model and
thread count, when it is ready, and which request fields make it generate exactly `max_tokens`
greedy tokens. `launch(kind, ...)` starts it as a child process and stops it again (by PID).

Invariants:
- Servers bind to 127.0.0.1 on a free port; their output goes to a temporary log file, never to
  the benchmark's stdout.
- Every engine gets the same model file and the same CPU thread count.
- Start-up is bounded (`startup_timeout`); a server that exits or never becomes ready raises
  `ServerUnavailable` with the tail of its log. Stopping sends SIGTERM, then SIGKILL after
  `stop_timeout`.
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Optional

from kvwise.bench.workloads import ModelFiles
from kvwise.errors import KvwiseError

LLAMACPP_N_CTX = 2048


class ServerUnavailable(KvwiseError, RuntimeError):
    """An engine's server cannot run here (package missing, no GGUF, crashed at start-up)."""


@dataclass(frozen=True)
class ServerKind:
    name: str
    # (model files, threads, port, kvwise engine flags) -> argv of the server process
    command: Callable[[ModelFiles, int, int, list[str]], list[str]]
    ready_path: str  # GET answers 200 once the model is loaded
    # max_tokens -> extra body fields of /v1/completions that make it generate max_tokens tokens
    request_extras: Callable[[int], dict[str, Any]]
    note: str  # how this server is configured, for the report


def _kvwise_command(files: ModelFiles, threads: int, port: int, flags: list[str]) -> list[str]:
    return [sys.executable, "-m", "kvwise.serving.cli", "serve", "--host", "127.0.0.1",
            "--port", str(port), "--log-level", "warning", *flags, "--threads", str(threads)]


def _llamacpp_command(files: ModelFiles, threads: int, port: int, flags: list[str]) -> list[str]:
    if files.gguf_path is None:
        raise ServerUnavailable(f"{files.name!r} is not a GGUF file")
    # interrupt_requests=False: by default llama_cpp.server cuts a streaming response short as
    # soon as another request arrives; queued requests must instead wait their turn.
    return [sys.executable, "-m", "llama_cpp.server", "--model", files.gguf_path,
            "--host", "127.0.0.1", "--port", str(port), "--n_threads", str(threads),
            "--n_threads_batch", str(threads), "--n_ctx", str(LLAMACPP_N_CTX),
            "--interrupt_requests", "False", "--verbose", "False"]


SERVERS: dict[str, ServerKind] = {
    "kvwise": ServerKind(
        "kvwise", _kvwise_command, "/health",
        lambda max_tokens: {"ignore_eos": True, "stream_options": {"include_usage": True}},
        "kvwise: `kvwise serve` (continuous batching), ignore_eos, output tokens from the "
        "stream's usage chunk."),
    "llamacpp": ServerKind(
        "llamacpp", _llamacpp_command, "/v1/models",
        # No ignore_eos in llama_cpp.server: min_tokens = max_tokens masks the EOS token instead
        # (its MinTokensLogitsProcessor); repeat_penalty 1.0 turns off its default of 1.1.
        lambda max_tokens: {"min_tokens": max_tokens, "repeat_penalty": 1.0},
        f"llamacpp: `python -m llama_cpp.server` (one request at a time, "
        f"interrupt_requests=False, n_ctx {LLAMACPP_N_CTX}), EOS masked with "
        "min_tokens=max_tokens; it reports no usage when streaming, so output tokens are "
        "counted as streamed text chunks (one per token, except where it holds back a partial "
        "UTF-8 character)."),
}
SERVER_NAMES = tuple(SERVERS)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: str, num_lines: int = 5) -> str:
    with open(path, errors="replace") as f:
        return " | ".join(line.strip() for line in f.readlines()[-num_lines:] if line.strip())


@dataclass
class RunningServer:
    name: str
    url: str
    proc: Optional[subprocess.Popen]  # None: a server the user started (--url)


def _wait_ready(proc: subprocess.Popen, url: str, log_path: str, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerUnavailable(f"exited with status {proc.returncode}: {_tail(log_path)}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise ServerUnavailable(f"not ready after {timeout:.0f} s: {_tail(log_path)}")


def _stop(proc: subprocess.Popen, timeout: float) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@contextlib.contextmanager
def launch(kind: ServerKind, files: ModelFiles, threads: int, flags: list[str], *,
           startup_timeout: float = 300.0, stop_timeout: float = 60.0) -> Iterator[RunningServer]:
    """Start `kind`'s server, yield it once ready, stop it on exit (also on errors)."""
    port = _free_port()
    argv = kind.command(files, threads, port, flags)
    log = tempfile.NamedTemporaryFile("w", prefix=f"bench-serve-{kind.name}-", suffix=".log",
                                      delete=False)
    try:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_ready(proc, url + kind.ready_path, log.name, startup_timeout)
            yield RunningServer(kind.name, url, proc)
        finally:
            _stop(proc, stop_timeout)
    finally:
        log.close()
        with contextlib.suppress(OSError):
            os.unlink(log.name)
