"""Node analysis rows: which ready nodes still wait for theirs, the claim an analyser
takes on one, and the analysis written once.

The claim is a compare-and-set on ``nodes.analysis_claimed_at``: one statement that
succeeds for one analyser only, on SQLite and PostgreSQL alike (under PostgreSQL's
read committed, a second claimer re-reads the row it waited for and finds it
claimed). A claim older than the stale time is free again, so a node whose analyser
died is taken up by another, and one that failed is tried again later.
"""

from __future__ import annotations

import json
from typing import Any

from sparrow.models import Node
from sparrow.store.db import Database, Tx
from sparrow.store.rows import NODE_COLUMNS, node_from_row

_WAITING = (
    "status = 'ready' AND analysis IS NULL "
    "AND (analysis_claimed_at IS NULL OR analysis_claimed_at < :stale)"
)


async def next_unanalysed(db: Database, stale_before: str) -> str | None:
    """The oldest ready node without an analysis that no live claim holds."""
    row = await db.fetchone(
        f"SELECT id FROM nodes WHERE {_WAITING} ORDER BY created_at LIMIT 1",
        {"stale": stale_before},
    )
    return str(row[0]) if row else None


class AnalysisWrites:
    tx: Tx

    async def claim_analysis(self, node_id: str, now: str, stale_before: str) -> Node | None:
        """Claim the node's analysis for this analyser; None if it is taken, done or gone."""
        rows = await self.tx.rows(
            f"UPDATE nodes SET analysis_claimed_at = :now WHERE id = :id AND {_WAITING} "
            f"RETURNING {NODE_COLUMNS}",
            {"id": node_id, "now": now, "stale": stale_before},
        )
        return node_from_row(rows[0]) if rows else None

    async def set_analysis(self, node_id: str, analysis: dict[str, Any]) -> Node | None:
        """Record the ready node's analysis once; None if it has one, or is gone."""
        await self.tx.lock_chain_of(node_id)  # the chain first, as every writer takes it
        rows = await self.tx.rows(
            "UPDATE nodes SET analysis = :analysis "
            f"WHERE id = :id AND status = 'ready' AND analysis IS NULL RETURNING {NODE_COLUMNS}",
            {"id": node_id, "analysis": json.dumps(analysis)},
        )
        return node_from_row(rows[0]) if rows else None
