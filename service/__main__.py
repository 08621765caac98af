"""``python -m service`` / ``vldeformer-serve``: run the API under uvicorn.

Settings come from ``VLD_*`` environment variables; the options below override them.
Exit codes: 0 clean shutdown, 1 start-up failed (model or paths), 2 invalid settings.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import uvicorn

from service.app import create_app
from service.settings import SettingsError, load_settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vldeformer-serve",
        description="Serve the vldeformer search API. Every option defaults to its VLD_* "
        "environment variable (e.g. --max-k ← VLD_MAX_K), then to the built-in default.",
    )
    parser.add_argument("--model-dir", type=Path, help="decomposed checkpoint (VLD_MODEL_DIR)")
    parser.add_argument("--index-root", type=Path, help="indexer output root (VLD_INDEX_ROOT)")
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:N (VLD_DEVICE; default auto)")
    parser.add_argument("--host", help="bind address (VLD_HOST; default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="bind port, 0 = any free (VLD_PORT; default 8000)")
    parser.add_argument("--queue-size", type=int, help="per-modality queue (VLD_QUEUE_SIZE; 64)")
    parser.add_argument(
        "--batch-window-ms", type=float, help="batch window, 0 = off (VLD_BATCH_WINDOW_MS; 5)"
    )
    parser.add_argument("--max-batch-size", type=int, help="queries per pass (VLD_MAX_BATCH_SIZE)")
    parser.add_argument("--poll-interval-s", type=float, help="poll CURRENT (VLD_POLL_INTERVAL_S)")
    parser.add_argument("--log-level", help="critical … debug (VLD_LOG_LEVEL; default info)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(**vars(args))
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,  # keep the root logging configured above
        access_log=False,
        timeout_graceful_shutdown=10,
    )
    server = uvicorn.Server(config)
    try:
        server.run()
    except SystemExit as exc:  # uvicorn exits with 3 when the lifespan start-up fails
        logging.getLogger(__name__).error("start-up failed (uvicorn exit code %s)", exc.code)
        return 1
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
