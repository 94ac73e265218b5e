"""Rows ↔ domain values, shared by the store's modules."""

from __future__ import annotations

import json
from typing import Any

from sparrow.domain.models import Chain, Node, NodeError, NodeKind, NodeStatus
from sparrow.store.db import Row

NODE_COLUMNS = (
    "id, chain_id, parent_id, kind, status, committed, duration_s, sample_rate, channels, "
    "frames, prompt, params, error, audio_sha256, created_at, updated_at, job_id"
)


_KINDS = {k.value: k for k in NodeKind}
_STATUSES = {s.value: s for s in NodeStatus}


def node_from_row(row: Row) -> Node:
    # Positional, in NODE_COLUMNS order: a long spine decodes thousands of rows.
    (
        id_, chain_id, parent_id, kind, status, committed, duration_s, sample_rate,
        channels, frames, prompt, params, error, audio_sha256, created_at, updated_at, job_id,
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
    )


def chain_from_row(row: Row) -> Chain:
    return Chain(
        id=row["id"],
        title=row["title"],
        owner=row["owner"],
        root_node_id=row["root_node_id"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        last_event_id=row["last_event_id"],
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
    }
