"""``python -m service`` / ``vldeformer-serve``: run the API under uvicorn.

Settings come from ``VLD_*`` environment variables; the options below override them (every
setting has one except the reload token, which stays in the environment).
The model is loaded before uvicorn starts (uvicorn would load it in the lifespan anyway before
taking connections), so a runtime that cannot be used ends in one line too.
Exit codes: 0 clean shutdown, 1 start-up failed (model or index), 2 a missing or invalid
setting, or a ``VLD_RUNTIME`` that cannot be used (one line on stderr naming its variable, no
traceback).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import uvicorn

from service.app import create_app, load_model
from service.protocol import JsonErrorH11Protocol
from service.settings import (
    Settings,
    SettingsError,
    env_name,
    load_settings,
    require_serving_paths,
)

# Settings that have no option: secrets (a token on a command line shows in `ps` and shell
# history). Every other setting has one.
ENV_ONLY_SETTINGS = frozenset({"reload_token"})


def _help(field: str) -> str:
    """The setting's description, its variable and its default, from :class:`Settings`."""
    info = Settings.model_fields[field]
    default = "unset" if info.default is None else info.default
    return f"{info.description} ({env_name(field)}; default {default})".replace("%", "%%")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vldeformer-serve",
        description="Serve the vldeformer search API. Every option defaults to its VLD_* "
        "environment variable (e.g. --max-k <- VLD_MAX_K), then to the built-in default.",
        epilog="The admin reload token is read from VLD_RELOAD_TOKEN only, never from an "
        "option: a token on a command line shows in `ps` and in shell history.",
    )
    options: list[tuple[str, type | None]] = [
        ("model_dir", Path),
        ("index_root", Path),
        ("teacher_dir", Path),
        ("rerank_default", None),  # --rerank-default / --no-rerank-default
        ("rerank_cache_size", int),
        ("device", str),
        ("runtime", str),
        ("torch_threads", int),
        ("host", str),
        ("port", int),
        ("max_upload_bytes", int),
        ("max_image_pixels", int),
        ("max_k", int),
        ("max_text_chars", int),
        ("queue_size", int),
        ("batch_window_ms", float),
        ("batch_max_wait_ms", float),
        ("max_batch_size", int),
        ("retry_after_s", int),
        ("poll_interval_s", float),
        ("verify_on_start", None),  # a switch: --verify-on-start / --no-verify-on-start
        ("log_level", str),
    ]
    for field, kind in options:
        flag = "--" + field.replace("_", "-")
        if kind is None:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=_help(field))
        else:
            parser.add_argument(flag, type=kind, help=_help(field))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(**vars(args))
        require_serving_paths(settings)  # before uvicorn, which would print a traceback
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from model.runtime import RuntimeUnavailable  # heavy (torch): only once settings are valid

    try:
        encoder = load_model(settings)
    except RuntimeUnavailable as exc:
        message = " ".join(str(exc).split())  # one line, whatever the exporter said
        print(f"error: {env_name('runtime')}={settings.runtime}: {message}", file=sys.stderr)
        return 2
    except Exception as exc:
        logging.getLogger(__name__).error(
            "start-up failed: the model at %s does not load: %s", settings.model_dir, exc
        )
        return 1
    config = uvicorn.Config(
        create_app(settings, load_encoder=lambda _: encoder),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,  # keep the root logging configured above
        access_log=False,
        timeout_graceful_shutdown=10,
        http=JsonErrorH11Protocol,  # malformed HTTP answered in the JSON error shape
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
