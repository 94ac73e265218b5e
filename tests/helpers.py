"""Small helpers shared by the API tests."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI

from sparrow.api import create_app
from sparrow.audio import render_music, write_wav
from sparrow.jobs import JobWorker
from sparrow.models import LOCAL_USER, Chain, Node, NodeKind, NodeStatus, Tier, new_id, utc_now
from sparrow.services import Services
from sparrow.settings import Settings

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample.flac"

ML_REASON = "needs the ml extra (torch, transformers, demucs): pip install -e '.[ml]'"


# Runs the test once on SQLite and once on a fresh PostgreSQL database (the
# ``database_url`` fixture, and through it ``settings`` and ``app``).
both_databases = pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)


def ml_installed() -> bool:
    """Whether the real engines' libraries are installed (CI installs them)."""
    return all(importlib.util.find_spec(name) for name in ("torch", "transformers", "demucs"))


async def upload(
    client: httpx.AsyncClient, path: Path, *, filename: str | None = None, title: str | None = None
) -> httpx.Response:
    files = {"file": (filename or path.name, path.read_bytes(), "application/octet-stream")}
    data = {"title": title} if title is not None else None
    return await client.post("/api/chains", files=files, data=data)


def services(app: FastAPI) -> Services:
    result: Services = app.state.services
    return result


def worker_of(app: FastAPI) -> JobWorker:
    """The app's job worker (every test app runs one)."""
    worker = services(app).worker
    assert worker is not None, "this app runs no worker"
    return worker


async def add_child(
    app: FastAPI,
    parent_id: str,
    *,
    status: NodeStatus = NodeStatus.READY,
    seconds: float = 1.0,
    seed: int = 3,
) -> Node:
    """Put a continuation under ``parent_id`` directly through the store, with real audio."""
    svc = services(app)
    parent = await svc.chains.get_node(LOCAL_USER, parent_id)
    node_id, now = new_id(), utc_now()
    fields: dict[str, Any] = {}
    if status is NodeStatus.READY:
        path = svc.media.node_audio(parent.chain_id, node_id)
        samples = render_music(seconds, 32000, 1, seed).astype(np.float32)
        info = write_wav(path, samples, 32000)
        fields = {
            "duration_s": info.duration_s,
            "sample_rate": info.sample_rate,
            "channels": info.channels,
            "frames": info.frames,
            "audio_sha256": info.sha256,
        }
    node = Node(
        id=node_id,
        chain_id=parent.chain_id,
        parent_id=parent.id,
        kind=NodeKind.CONTINUATION,
        status=status,
        committed=False,
        prompt="test",
        params={"seed": seed, "duration_s": seconds},
        created_at=now,
        updated_at=now,
        **fields,
    )
    async with svc.chains.store.write() as w:
        await w.insert_nodes([node])
    return node


async def branch(client: httpx.AsyncClient, parent_id: str, **body: Any) -> list[dict[str, Any]]:
    """Branch and return the new nodes (asserting the 202)."""
    response = await client.post(f"/api/nodes/{parent_id}/branch", json=body)
    assert response.status_code == 202, response.text
    nodes: list[dict[str, Any]] = response.json()["nodes"]
    return nodes


async def wait_for_status(
    client: httpx.AsyncClient, node_ids: list[str], *statuses: str, timeout_s: float = 20
) -> list[dict[str, Any]]:
    """Poll until every node has one of ``statuses``; returns the nodes."""
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = [(await client.get(f"/api/nodes/{n}")).json() for n in node_ids]
        if all(n.get("status") in statuses for n in nodes):
            return nodes
        if time.monotonic() > deadline:
            raise AssertionError(f"nodes did not reach {statuses}: {nodes}")
        await asyncio.sleep(0.02)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@contextlib.asynccontextmanager
async def authed_app(
    tmp_path: Path, keys: dict[str, Tier], **settings: Any
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient, dict[str, str]]]:
    """The app with auth on (mock engines), a client, and a key per name in ``keys``."""
    config = Settings(data_dir=tmp_path / "d", engine="mock", auth="on", **settings)
    app = create_app(config)
    async with app.router.lifespan_context(app):
        service = services(app).keys
        tokens = {
            name: (await service.create(tier=tier, name=name))[1] for name, tier in keys.items()
        }
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            yield app, client, tokens


def chain_with_root() -> tuple[Chain, Node]:
    """A new chain and its ready root, not stored yet."""
    now = utc_now()
    root = Node(
        id=new_id(),
        chain_id=new_id(),
        parent_id=None,
        kind=NodeKind.UPLOAD,
        status=NodeStatus.READY,
        committed=True,
        created_at=now,
        updated_at=now,
    )
    return Chain(root.chain_id, "t", root.id, now, now), root


def recorded_rows(engine: Any, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The rows (``sparrow.engines.Row``) the engine's batches take from now on, in order."""
    asked: list[Any] = []
    make = engine.batch

    def batch() -> Any:
        made = make()
        add = made.add

        def recording(row: Any) -> None:
            asked.append(row)
            add(row)

        made.add = recording
        return made

    monkeypatch.setattr(engine, "batch", batch)
    return asked


def child_processes(of: int | None = None) -> list[int]:
    """Pids of this process's (or ``of``'s) children, zombies included, but for its
    Python workers (the analysis process and ``multiprocessing``'s resource tracker,
    which live as long as it does): FFmpeg, and the wrappers it starts under."""
    me = str(os.getpid() if of is None else of)
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if fields[1] != me or b"multiprocessing" in (entry / "cmdline").read_bytes():
                continue
        except OSError:
            continue
        found.append(int(entry.name))
    return found
