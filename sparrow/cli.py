"""The ``sparrow`` command.

sparrow serve [--host H] [--port P]    run the API server
sparrow make-tiny-models DIR           write tiny random-weight MusicGen and Demucs models
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from sparrow.api import create_app
    from sparrow.settings import Settings

    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        print(f"sparrow: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        proxy_headers=False,
        timeout_graceful_shutdown=10,
    )
    return 0


def _make_tiny_models(args: argparse.Namespace) -> int:
    from sparrow.engines.tiny import make_tiny_models

    models = make_tiny_models(args.folder)
    print(f"MusicGen (save_pretrained folder): {models.musicgen}")
    print(f"Demucs (local repo, model {models.demucs_name!r}): {models.demucs}")
    print(f"Use them with: SPARROW_MUSICGEN_MODEL={models.musicgen} sparrow serve")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparrow", description="Sparrow music-continuation backend."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the API server")
    serve.add_argument("--host", help="bind address (default: SPARROW_HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default: SPARROW_PORT or 8520)")
    serve.set_defaults(run=_serve)

    tiny = commands.add_parser(
        "make-tiny-models",
        help="write tiny random-weight MusicGen and Demucs models (for tests and demos)",
        description="Writes FOLDER/musicgen (a save_pretrained folder) and FOLDER/demucs "
        "(a Demucs local repo) with random weights in the real on-disk formats; they "
        "load through the same code as real checkpoints, with no hub access. The audio "
        "they make is noise-like: they exercise the engines, not the music.",
    )
    tiny.add_argument("folder", type=Path, help="where to write the models")
    tiny.set_defaults(run=_make_tiny_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.run(args)
    return result
