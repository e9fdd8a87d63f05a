"""ddpm-serve: load the weights, then serve the API with uvicorn.

Every Settings field is a flag (--max-batch 16) and an environment variable (DDPM_MAX_BATCH=16);
flags win. The weights are loaded before uvicorn starts, so a missing or corrupt file ends the
process with one line on stderr and exit status 1, not a traceback.
"""

from __future__ import annotations

import argparse
import sys
import typing

import uvicorn
from pydantic import ValidationError

from server.api.errors import describe_validation_errors
from server.app import StartupError, create_app, load_model, real_engine_factory, reserve_cores_for_engine
from server.settings import Settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ddpm-serve",
        description="Serve a DDPM over HTTP and WebSocket. Each flag is also a DDPM_* environment variable.",
    )
    for name, field in Settings.model_fields.items():
        choices = typing.get_args(field.annotation) if typing.get_origin(field.annotation) is typing.Literal else None
        default = field.default_factory() if field.default_factory else field.default
        help_text = f"{field.description + '; ' if field.description else ''}default {default!r}; env DDPM_{name.upper()}"
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, choices=choices, help=help_text)
    return parser


def settings_from(argv: list[str] | None) -> Settings:
    """Flags over environment over defaults; pydantic validates and converts the flags' strings."""
    flags = {name: value for name, value in vars(build_parser().parse_args(argv)).items() if value is not None}
    return Settings(**flags)


def main(argv: list[str] | None = None) -> int:
    try:
        settings = settings_from(argv)
        torch_threads = reserve_cores_for_engine(settings)
        ddpm = load_model(settings)
    except ValidationError as exc:
        print(f"ddpm-serve: error: {describe_validation_errors(exc.errors(), whole='settings')}", file=sys.stderr)
        return 2
    except StartupError as exc:
        print(f"ddpm-serve: error: {exc}", file=sys.stderr)
        return 1
    app = create_app(settings, engine_factory=real_engine_factory(ddpm, torch_threads))
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.shutdown_grace_s) or None,
        ws_max_size=settings.max_body_bytes,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
