from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import corpus
import httpx
import pg
import pytest
from corpus import BadUpload, GoodUpload
from fastapi import FastAPI
from helpers import ML_REASON, ml_installed
from pg import PostgresServer, running_postgres
from sse_starlette.sse import AppStatus

from sparrow.api import create_app
from sparrow.settings import Settings

if TYPE_CHECKING:
    from sparrow.engines.tiny import TinyModels


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests configure Sparrow explicitly, never through the developer's environment."""
    for name in list(os.environ):
        if name.startswith("SPARROW_") or name == "CF_MUSICGEN_MOCK":
            monkeypatch.delenv(name)


@pytest.fixture(autouse=True)
def _sse_not_exiting() -> None:
    """sse-starlette keeps a process-wide exit flag that nothing resets between tests."""
    AppStatus.should_exit = False


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One real PostgreSQL server for the session (Debian's binaries, 127.0.0.1 only).

    Missing binaries skip the tests that need it, with one reason; on CI, where the
    test command installs them, they fail instead.
    """
    with running_postgres() as server:
        if server is None:
            if os.environ.get("CI"):
                pytest.fail(f"{pg.REASON} on CI")
            pytest.skip(pg.REASON)
        yield server


@pytest.fixture
def database_url(request: pytest.FixtureRequest) -> str | None:
    """None (SQLite, the default), or a fresh PostgreSQL database's URL for tests
    parametrized with ``@both_databases``. ``TEST_DATABASE=postgresql`` runs every
    in-process test on PostgreSQL."""
    kind = getattr(request, "param", os.environ.get("TEST_DATABASE", "sqlite"))
    if kind == "sqlite":
        return None
    server: PostgresServer = request.getfixturevalue("postgres")
    return server.new_database()


@pytest.fixture
def settings(tmp_path: Path, database_url: str | None) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        engine="mock",
        database_url=database_url,
        worker="on",  # on PostgreSQL too: the in-process tests run their jobs themselves
    )


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[FastAPI]:
    """The app with its lifespan running (database open, services built)."""
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://sparrow.test") as c:
        yield c


@pytest.fixture(scope="session")
def good_uploads(tmp_path_factory: pytest.TempPathFactory) -> dict[str, GoodUpload]:
    """One file per supported format, built once per test session."""
    return corpus.make_good_uploads(tmp_path_factory.mktemp("good"))


@pytest.fixture(scope="session")
def bad_uploads(tmp_path_factory: pytest.TempPathFactory) -> dict[str, BadUpload]:
    """The hostile and broken upload cases, built once per test session."""
    return {c.name: c for c in corpus.make_bad_uploads(tmp_path_factory.mktemp("bad"))}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    """Tiny random-weight MusicGen and Demucs models on disk, built once per session.

    Without the ml extra, every test that asks for them is skipped with one reason.
    """
    if not ml_installed():
        pytest.skip(ML_REASON)
    from sparrow.engines.tiny import make_tiny_models

    return make_tiny_models(tmp_path_factory.mktemp("models"))
