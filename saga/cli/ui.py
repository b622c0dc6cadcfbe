"""``kafka-saga ui``: serve the web console (saga.ui) under uvicorn until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import sys

from saga.cli.app import CommandError, configure_logging, resolve_config

__all__ = ["add_arguments", "cmd_ui"]


def add_arguments(sub: argparse.ArgumentParser) -> None:
    """``ui``'s options."""
    sub.add_argument("--port", type=int, metavar="PORT", help="HTTP port (default: ui.port, 8080)")
    sub.add_argument("--host", metavar="ADDRESS", help="address to listen on (default: ui.host, 127.0.0.1)")
    sub.add_argument(
        "--token",
        metavar="TOKEN",
        help="enable the actions for whoever gives this token (default: ui.token; none: read-only)",
    )


def cmd_ui(args: argparse.Namespace) -> int:
    """``kafka-saga ui``."""
    config = resolve_config(args.config)
    configure_logging(config.logging)
    try:
        import uvicorn

        from saga.ui import create_app
    except ImportError as exc:
        raise CommandError(f"the console needs the ui extra: pip install 'kafka-saga[ui]' ({exc})") from exc
    token = args.token or config.ui.token
    port = args.port or config.ui.port
    host = args.host or config.ui.host
    app = create_app(config, token=token)
    mode = "actions need the token" if token else "read-only: no token"
    print(f"kafka-saga ui: http://{host}:{port}/ ({mode})", file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", lifespan="on")
    return 0
