"""Rows ↔ domain values, shared by the store's modules."""

from __future__ import annotations

import json
from collections.abc import Iterable
from enum import StrEnum
from typing import Any

from sparrow.models import Chain, Node, NodeError, NodeKind, NodeStatus, utc_now
from sparrow.store.db import Row

CHAIN_COLUMNS = "id, title, owner, root_node_id, created_at, updated_at, last_event_id"
NODE_COLUMNS = (
    "id, chain_id, parent_id, kind, status, committed, duration_s, sample_rate, channels, "
    "frames, prompt, params, error, audio_sha256, created_at, updated_at, job_id, from_s, "
    "analysis"
)


_KINDS = {k.value: k for k in NodeKind}
_STATUSES = {s.value: s for s in NodeStatus}


def node_from_row(row: Row) -> Node:
    # Positional, in NODE_COLUMNS order: a long spine decodes thousands of rows.
    (
        id_, chain_id, parent_id, kind, status, committed, duration_s, sample_rate,
        channels, frames, prompt, params, error, audio_sha256, created_at, updated_at, job_id,
        from_s, analysis,
    ) = row  # fmt: skip
    return Node(
        id=id_,
        chain_id=chain_id,
        parent_id=parent_id,
        kind=_KINDS[kind],
        status=_STATUSES[status],
        committed=bool(committed),
        duration_s=duration_s,
        sample_rate=sample_rate,
        channels=channels,
        frames=frames,
        prompt=prompt,
        params=json.loads(params) if params else None,
        error=NodeError(**json.loads(error)) if error else None,
        audio_sha256=audio_sha256,
        created_at=created_at,
        updated_at=updated_at,
        job_id=job_id,
        from_s=from_s,
        analysis=json.loads(analysis) if analysis else None,
    )


def chain_from_row(row: Row) -> Chain:
    # In CHAIN_COLUMNS order.
    id_, title, owner, root_node_id, created_at, updated_at, last_event_id = row
    return Chain(
        id=id_,
        title=title,
        owner=owner,
        root_node_id=root_node_id,
        created_at=created_at,
        updated_at=updated_at,
        last_event_id=int(last_event_id),
    )


def node_values(node: Node) -> dict[str, Any]:
    return {
        "id": node.id,
        "chain_id": node.chain_id,
        "parent_id": node.parent_id,
        "kind": node.kind.value,
        "status": node.status.value,
        "committed": int(node.committed),
        "duration_s": node.duration_s,
        "sample_rate": node.sample_rate,
        "channels": node.channels,
        "frames": node.frames,
        "prompt": node.prompt,
        "params": json.dumps(node.params) if node.params is not None else None,
        "error": json.dumps(node.error.__dict__) if node.error else None,
        "audio_sha256": node.audio_sha256,
        "created_at": node.created_at,
        "updated_at": node.updated_at,
        "job_id": node.job_id,
        "from_s": node.from_s,
        "analysis": json.dumps(node.analysis) if node.analysis is not None else None,
    }


def guarded_update(
    table: str,
    key: str,
    returning: str,
    sources: Iterable[StrEnum],
    columns: Iterable[str],
) -> str:
    """SQL that changes a row's status only from one of ``sources`` (its lifecycle).

    Parameters: ``:status``, ``:error``, ``:now``, ``:key`` and one per extra
    column; the statement returns the changed row, or nothing.
    """
    assignments = "".join(f", {column} = :{column}" for column in columns)
    allowed = ", ".join(f"'{s.value}'" for s in sorted(sources))
    return (
        f"UPDATE {table} SET status = :status, error = :error, updated_at = :now{assignments} "
        f"WHERE {key} = :key AND status IN ({allowed}) RETURNING {returning}"
    )


def status_params(status: StrEnum, error: Any, key: str, **columns: Any) -> dict[str, Any]:
    """The parameters of a ``guarded_update``; ``error`` is a NodeError or None."""
    return {
        "status": status.value,
        "error": json.dumps(error.__dict__) if error else None,
        "now": utc_now(),
        "key": key,
        **columns,
    }
