"""CORS with an explicit origin list: credentials allowed, other origins refused."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from sparrow.api import create_app
from sparrow.settings import Settings

pytestmark = pytest.mark.anyio


async def test_explicit_origins(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path, cors_origins="https://editor.example, http://localhost:5173"
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://s.test") as client:
            allowed = await client.get("/healthz", headers={"Origin": "https://editor.example"})
            assert allowed.headers["access-control-allow-origin"] == "https://editor.example"
            assert allowed.headers["access-control-allow-credentials"] == "true"
            other = await client.get("/healthz", headers={"Origin": "https://evil.example"})
            assert "access-control-allow-origin" not in other.headers
            preflight = await client.options(
                "/api/chains",
                headers={
                    "Origin": "http://localhost:5173",
                    "Access-Control-Request-Method": "POST",
                },
            )
            assert preflight.status_code == 200
            assert preflight.headers["access-control-allow-origin"] == "http://localhost:5173"
