"""`kvwise serve`: the OpenAI-compatible server as a CLI subcommand.

`add_serve_parser(subparsers)` declares the subcommand (engine flags from `kvwise.config` plus the
server flags below); `python -m kvwise.serving.cli serve ...` runs it standalone.

Invariants:
- Binds to 127.0.0.1 unless --host says otherwise.
- Declaring the parser imports no torch, fastapi or uvicorn, and bad flags (server or engine)
  are reported before they are imported, so `--help` and argument errors answer at once.
- SIGTERM/SIGINT: stop accepting connections, let in-flight requests finish for up to
  --shutdown-timeout seconds, abort the rest, stop the engine thread, exit 0.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import Any, Optional

from kvwise.config import add_engine_args, engine_config_from_args
from kvwise.errors import KvwiseError

logger = logging.getLogger("kvwise.serving")


def add_server_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    g.add_argument("--port", type=int, default=8000, help="TCP port")
    g.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route but /health, /metrics")
    g.add_argument("--max-queued-requests", type=int, default=None,
                   help="requests that may wait for a slot; more get HTTP 503 (default: no limit)")
    g.add_argument("--served-model-name", action="append", default=None,
                   help="model name(s) clients use (repeatable; default: --model)")
    g.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish on SIGTERM before being aborted")
    g.add_argument("--watchdog-timeout", type=float, default=600.0,
                   help="/health answers 503 when one engine step runs longer than this")
    g.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `serve` subcommand to a `kvwise` CLI's subparsers; it dispatches via args.func."""
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server",
                              description="Serve a model over an OpenAI-compatible HTTP API.")
    add_engine_args(p)
    add_server_args(p)
    p.set_defaults(func=run_serve)
    return p


def _validate(args: argparse.Namespace) -> None:
    if not 0 <= args.port <= 65535:
        raise SystemExit(f"--port: must be in [0, 65535], got {args.port}")
    if args.max_queued_requests is not None and args.max_queued_requests < 0:
        raise SystemExit(f"--max-queued-requests: must be >= 0, got {args.max_queued_requests}")
    if args.shutdown_timeout < 0:
        raise SystemExit(f"--shutdown-timeout: must be >= 0, got {args.shutdown_timeout}")


def run_serve(args: argparse.Namespace) -> int:
    """Load the engine, then serve until SIGTERM/SIGINT; returns the exit code."""
    _validate(args)
    try:
        config = engine_config_from_args(args)
    except KvwiseError as e:
        print(f"kvwise serve: {e}", file=sys.stderr)
        return 2
    import uvicorn

    from kvwise.engine.async_engine import AsyncEngine
    from kvwise.engine.engine import LLMEngine
    from kvwise.serving.openai_api import ServerSettings, build_app

    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        engine = LLMEngine(config)
    except KvwiseError as e:
        print(f"kvwise serve: {e}", file=sys.stderr)
        return 2
    names = args.served_model_name or [config.model]
    async_engine = AsyncEngine(engine, max_num_seqs=config.max_num_seqs,
                               max_queued_requests=args.max_queued_requests)
    app = build_app(async_engine, ServerSettings(
        served_model_names=names, api_key=args.api_key, shutdown_timeout=args.shutdown_timeout,
        watchdog_timeout=args.watchdog_timeout))
    server = uvicorn.Server(uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
        timeout_graceful_shutdown=args.shutdown_timeout, timeout_keep_alive=5))
    # uvicorn re-raises the signal that stopped it once it has shut down gracefully; with the
    # default handlers that would turn a clean SIGTERM shutdown into exit status 143.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    if not server.started:
        return 1
    logger.info("server stopped")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="kvwise")
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_parser(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
