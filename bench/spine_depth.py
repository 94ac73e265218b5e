"""Spine read (recursive CTE) on a deep chain, against baselines measured in the same run.

    python -m bench.spine_depth [--depth 10000] [--repeat 20]

Builds a chain whose spine is ``depth`` nodes long, each spine node with one
uncommitted sibling branch (2·depth nodes), in a real SQLite file, then times:

- ``scan``: the store reading every node of the chain with one indexed
  ``SELECT`` (no recursion), decoded into Nodes;
- ``scan of the spine's rows``: baseline — one indexed ``SELECT`` of the chain's
  committed nodes (the spine's rows, found without recursion), decoded the same way;
- ``spine``: ``ChainStore.spine`` — one recursive CTE, rows decoded into Nodes;
- ``spine ids``: the same CTE returning only ids (the SQL without row decoding),
  against the same indexed ``SELECT`` returning only ids;
- ``walk``: the naive alternative — one ``get_node`` per level from the tail up;
- ``commit``: moving the spine's tail to a sibling (uncommit + commit, two CTEs).

Ratios are against the scan of the spine's rows: what finding the path by
recursion costs over reading the same rows when they are already known.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from bench.table import Options, Row, progress
from bench.timing import interleaved, timed
from sparrow.events import EventHub
from sparrow.models import Chain, Node, NodeKind, NodeStatus, new_id, utc_now
from sparrow.store import ChainStore
from sparrow.store.rows import NODE_COLUMNS, node_from_row
from sparrow.store.sqlite import SqliteDatabase as Database

# The baseline: the spine's rows through the chain's index, no recursion. The spine
# is exactly the committed nodes of the chain (the invariant the CTE follows).
_COMMITTED = (
    f"SELECT {NODE_COLUMNS} FROM nodes WHERE chain_id = ? AND committed = 1 "
    "ORDER BY created_at, rowid"
)
_COMMITTED_IDS = "SELECT id FROM nodes WHERE chain_id = ? AND committed = 1"


def _node(chain_id: str, parent: str | None, committed: bool) -> Node:
    now = utc_now()
    return Node(
        id=new_id(),
        chain_id=chain_id,
        parent_id=parent,
        kind=NodeKind.CONTINUATION if parent else NodeKind.UPLOAD,
        status=NodeStatus.READY,
        committed=committed,
        duration_s=10.0,
        sample_rate=32000,
        channels=1,
        frames=320000,
        params={"seed": 1, "temperature": 1.0},
        created_at=now,
        updated_at=now,
    )


async def build(store: ChainStore, depth: int) -> tuple[str, list[Node], list[Node]]:
    """A chain with a spine of ``depth`` nodes, each but the root with one sibling.

    All nodes go in with one ``executemany`` in one transaction: 100,000 deep
    builds in seconds.
    """
    chain_id = new_id()
    root = _node(chain_id, None, True)
    now = utc_now()
    async with store.write() as w:
        await w.create_chain(Chain(chain_id, "bench", root.id, now, now), root)
    spine, siblings = [root], []
    for _ in range(depth - 1):
        parent = spine[-1].id
        spine.append(_node(chain_id, parent, True))
        siblings.append(_node(chain_id, parent, False))
    async with store.write() as w:
        await w.insert_nodes(spine[1:] + siblings)
    return chain_id, spine, siblings


async def scan_spine_rows(db: Database, chain_id: str) -> list[Node]:
    """The baseline: the chain's committed rows by its index, decoded into Nodes."""
    return [node_from_row(r) for r in await db.fetchall(_COMMITTED, (chain_id,))]


async def scan_spine_ids(db: Database, chain_id: str) -> list[str]:
    """The baseline for the bare SQL: the committed rows' ids, no decoding."""
    return [r[0] for r in await db.fetchall(_COMMITTED_IDS, (chain_id,))]


@dataclass(frozen=True)
class SpineTimes:
    """Median seconds of each way of reading a spine of ``depth`` nodes."""

    depth: int
    build_s: float
    scan: float | None  # every node of the chain, decoded (None when not measured)
    scan_spine: float  # the spine's rows by index, decoded (the baseline)
    spine: float  # the recursive CTE, decoded
    scan_spine_ids: float
    spine_ids: float
    walk: float | None  # one query per level (None when not measured)
    commit: float | None  # moving the tail (None when not measured)


async def measure(depth: int, repeat: int, *, extras: bool = True) -> SpineTimes:
    """Build a chain ``depth`` deep in a fresh SQLite file and time its spine reads.

    The CTE and its baselines are sampled interleaved; ``extras`` adds the scan of
    the whole chain, the one-query-per-level walk and the commit at the tail
    (slow at great depths).
    """
    with tempfile.TemporaryDirectory() as tmp:
        db = Database(Path(tmp) / "bench.db")
        await db.open()
        try:
            store = ChainStore(db, EventHub())
            started = time.perf_counter()
            chain_id, spine, siblings = await build(store, depth)
            build_s = time.perf_counter() - started
            await _check(store, db, chain_id, spine)
            reads: dict[str, Callable[[], Awaitable[object]]] = {
                "scan_spine": lambda: scan_spine_rows(db, chain_id),
                "spine": lambda: store.spine(chain_id),
                "scan_spine_ids": lambda: scan_spine_ids(db, chain_id),
                "spine_ids": lambda: store.spine_ids(chain_id),
            }
            if extras:
                reads["scan"] = lambda: store.list_nodes(chain_id)
            t = await interleaved(reads, repeat)
            walk = commit = None
            if extras:
                walk = await timed(lambda: _walk(store, spine[-1].id), max(1, repeat // 10))
                tails = (siblings[-1], spine[-1])
                commit = await timed(lambda: _move_tail(store, chain_id, tails), repeat // 2 or 1)
                commit /= 2
        finally:
            await db.close()
    return SpineTimes(
        depth=depth,
        build_s=build_s,
        scan=t.get("scan"),
        scan_spine=t["scan_spine"],
        spine=t["spine"],
        scan_spine_ids=t["scan_spine_ids"],
        spine_ids=t["spine_ids"],
        walk=walk,
        commit=commit,
    )


async def _check(store: ChainStore, db: Database, chain_id: str, spine: list[Node]) -> None:
    expected = [n.id for n in spine]
    assert [n.id for n in await store.spine(chain_id)] == expected, "spine order is wrong"
    assert sorted(await scan_spine_ids(db, chain_id)) == sorted(expected), "baseline rows differ"


async def _walk(store: ChainStore, tail_id: str) -> None:
    node_id: str | None = tail_id
    while node_id is not None:
        node = await store.get_node(node_id)
        assert node is not None
        node_id = node.parent_id


async def _move_tail(store: ChainStore, chain_id: str, tails: tuple[Node, ...]) -> None:
    for tail in tails:
        async with store.write() as w:
            await w.commit_path(tail.id, chain_id)


def print_times(t: SpineTimes) -> None:
    rows = [
        ("scan of the chain", t.scan, 2 * t.depth - 1),
        ("scan of the spine's rows", t.scan_spine, t.depth),
        ("spine CTE", t.spine, t.depth),
        ("scan of the spine's ids", t.scan_spine_ids, t.depth),
        ("spine CTE, ids only", t.spine_ids, t.depth),
        ("walk, one query per level", t.walk, t.depth),
        ("commit at the tail", t.commit, t.depth),
    ]
    base = t.scan_spine
    print(f"\n{'operation':<28}{'rows':>8}{'ms':>10}{'× spine rows':>14}")
    for name, seconds, n in rows:
        if seconds is not None:
            print(f"{name:<28}{n:>8}{seconds * 1e3:>10.2f}{seconds / base:>14.2f}")


# (depth, repeat) for the table. --quick leaves out depth 100,000: building it
# alone takes 10-30 s on 2 cores.
QUICK = ((1_000, 10), (10_000, 5))
FULL = ((1_000, 30), (10_000, 15), (100_000, 5))


def table_rows(options: Options) -> list[Row]:
    """The spine CTE against the indexed scan of its rows, decoded and ids only."""
    rows = []
    for depth, repeat in QUICK if options.quick else FULL:
        t = asyncio.run(measure(depth, repeat, extras=False))
        progress(f"spine depth {depth:,}: {2 * depth - 1:,} nodes built in {t.build_s:.1f} s")
        rows += [
            Row(
                f"spine CTE → Nodes, depth {depth:,} vs indexed scan of its rows",
                t.spine * 1e3,
                t.scan_spine * 1e3,
                "ms",
            ),
            Row(
                f"spine CTE, ids only, depth {depth:,} vs indexed scan of its ids",
                t.spine_ids * 1e3,
                t.scan_spine_ids * 1e3,
                "ms",
            ),
        ]
    return rows


async def main(depth: int, repeat: int) -> None:
    t = await measure(depth, repeat)
    print(f"built a chain of {2 * depth - 1} nodes, spine depth {depth}, in {t.build_s:.2f} s")
    print_times(t)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    asyncio.run(main(args.depth, args.repeat))
