"""The ``sparrow`` command.

sparrow serve [--host H] [--port P]                 run the API server
sparrow worker                                      run one worker process (PostgreSQL)
sparrow keys create --tier free|paid [--name N]     create an API key (the key is the last line)
sparrow keys list | revoke ID | set-tier ID TIER    manage keys
sparrow db migrate                                  bring the database's schema up to date
sparrow make-tiny-models DIR                        write tiny random-weight models
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from sparrow.settings import Settings


def _settings(**overrides: object) -> Settings | None:
    """The settings from the environment (and ``overrides``); None, said why, if invalid."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        print(f"sparrow: invalid configuration:\n{exc}", file=sys.stderr)
        return None


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from sparrow.api import create_app
    from sparrow.api.serving import server_config
    from sparrow.heap import own_heap

    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    settings = _settings(**overrides)
    if settings is None:
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if settings.database_url is not None and (problem := _unreachable(settings)):
        print(f"sparrow: {problem}", file=sys.stderr)
        return 1
    own_heap()
    uvicorn.Server(
        server_config(create_app(settings), host=settings.host, port=settings.port)
    ).run()
    return 0


def _unreachable(settings: Settings) -> str | None:
    """Why the database cannot be opened (and migrated), in one sentence; None if it can."""
    import asyncio

    from sparrow.errors import SparrowError
    from sparrow.store import open_database

    async def check() -> None:
        db = open_database(settings)
        try:
            await db.open()
        finally:
            await db.close()

    try:
        asyncio.run(check())
    except SparrowError as exc:
        return exc.detail
    return None


def _worker(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    from sparrow.errors import SparrowError
    from sparrow.heap import own_heap
    from sparrow.services import running_services

    settings = _settings(worker="on", preload_model=True)
    if settings is None:
        return 2
    if settings.database_url is None:
        print(
            "sparrow: sparrow worker takes its jobs from PostgreSQL: set SPARROW_DATABASE_URL "
            "(with SQLite, sparrow serve runs the jobs itself).",
            file=sys.stderr,
        )
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("sparrow.worker")
    own_heap()

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        async with running_services(settings) as services:
            worker = services.worker
            assert worker is not None
            log.info("worker started: taking jobs until SIGTERM")
            await stop.wait()
            log.info("stopping: the running jobs, if any, go back to the queue")

    try:
        asyncio.run(run())
    except SparrowError as exc:
        print(f"sparrow: {exc.detail}", file=sys.stderr)
        return 1
    return 0


def _make_tiny_models(args: argparse.Namespace) -> int:
    from sparrow.engines.tiny import make_tiny_models

    models = make_tiny_models(args.folder)
    print(f"MusicGen (save_pretrained folder): {models.musicgen}")
    print(f"Demucs (local repo, model {models.demucs_name!r}): {models.demucs}")
    print(f"Use them with: SPARROW_MUSICGEN_MODEL={models.musicgen} sparrow serve")
    return 0


def _keys(args: argparse.Namespace) -> int:
    import asyncio

    from sparrow.domain.keys import KeyService
    from sparrow.errors import SparrowError
    from sparrow.models import Tier
    from sparrow.store import open_database
    from sparrow.store.keys import KeyStore

    settings = _settings()
    if settings is None:
        return 2

    async def run() -> int:
        db = open_database(settings)
        try:
            await db.open()
            keys = KeyService(KeyStore(db), enabled=True)
            if args.action == "create":
                record, key = await keys.create(tier=Tier(args.tier), name=args.name)
                print(f"Created {record.tier} key {record.id} ({record.name}).")
                print("Store it now: it is shown only this once.")
                print(key)
            elif args.action == "list":
                for record in await keys.keys.list():
                    print(f"{record.id}  {record.tier:<4}  {record.created_at}  {record.name}")
            elif args.action == "revoke":
                await keys.revoke(args.key_id)
                print(f"Revoked key {args.key_id}; its chains stay, reachable by no key.")
            else:
                await keys.set_tier(args.key_id, Tier(args.tier))
                print(f"Key {args.key_id} is now {args.tier}.")
        except SparrowError as exc:
            print(f"sparrow: {exc.detail}", file=sys.stderr)
            return 1
        finally:
            await db.close()
        return 0

    return asyncio.run(run())


def _db(args: argparse.Namespace) -> int:
    import asyncio

    from sparrow.errors import SparrowError
    from sparrow.store import open_database
    from sparrow.store.db import describe

    settings = _settings()
    if settings is None:
        return 2
    db = open_database(settings)

    async def migrate() -> None:
        try:
            await db.open()  # migrates; several processes at once take turns
        finally:
            await db.close()

    try:
        asyncio.run(migrate())
    except SparrowError as exc:
        print(f"sparrow: {exc.detail}", file=sys.stderr)
        return 1
    except Exception as exc:
        print(f"sparrow: cannot migrate {describe(settings)}: {exc}", file=sys.stderr)
        return 1
    print(f"The database is at schema version {db.schema_version}.")
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

    worker = commands.add_parser(
        "worker",
        help="run one worker process (one GPU): take jobs from PostgreSQL until SIGTERM",
        description="Loads the engines, then takes generation and stems jobs from the shared "
        "queue in PostgreSQL (SPARROW_DATABASE_URL) until SIGTERM, which hands the running "
        "job back to the queue. Run one per GPU (CUDA_VISIBLE_DEVICES).",
    )
    worker.set_defaults(run=_worker)

    keys = commands.add_parser(
        "keys",
        help="manage API keys (used with SPARROW_AUTH=on)",
        description="Keys live in the database under SPARROW_DATA_DIR (or "
        "SPARROW_DATABASE_PATH); only their hashes are stored.",
    )
    actions = keys.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="create a key; the key alone is the last line")
    create.add_argument("--tier", choices=["free", "paid"], required=True)
    create.add_argument("--name", help="a label to recognise the key by")
    actions.add_parser("list", help="list keys (ids, tiers, names; never the keys)")
    revoke = actions.add_parser("revoke", help="delete a key: it stops working at once")
    revoke.add_argument("key_id")
    set_tier = actions.add_parser("set-tier", help="change a key's tier")
    set_tier.add_argument("key_id")
    set_tier.add_argument("tier", choices=["free", "paid"])
    keys.set_defaults(run=_keys)

    db = commands.add_parser("db", help="the database")
    db_actions = db.add_subparsers(dest="action", required=True)
    db_actions.add_parser(
        "migrate",
        help="bring the schema up to date and exit (start-up does it too)",
        description="Runs the migrations the database at SPARROW_DATABASE_PATH (default "
        "SPARROW_DATA_DIR/sparrow.db) lacks, in one transaction; processes migrating at "
        "once take turns.",
    )
    db.set_defaults(run=_db)

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
    from sparrow.priority import background

    args = build_parser().parse_args(argv)
    try:
        result: int = args.run(args)
    finally:  # the analysis process ends with the server, not after its running analysis
        background.forget(kill=True)
    return result
