"""Spine read (recursive CTE) on a deep chain, against baselines measured in the same run.

    python -m bench.spine_depth [--depth 10000] [--repeat 20]

Builds a chain whose spine is ``depth`` nodes long, each spine node with one
uncommitted sibling branch (2·depth nodes), in a real SQLite file, then times:

- ``spine``: ``ChainStore.spine`` — one recursive CTE, rows decoded into Nodes;
- ``scan``: baseline — the same store reading every node of the chain with one
  indexed ``SELECT`` (no recursion), decoded the same way;
- ``spine ids``: the same CTE returning only ids (the SQL without row decoding);
- ``walk``: the naive alternative — one ``get_node`` per level from the tail up;
- ``commit``: moving the spine's tail to a sibling (uncommit + commit, two CTEs).

Ratios are against ``scan``: the CTE's cost over simply reading the rows.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from sparrow.domain.models import Chain, Node, NodeKind, NodeStatus, new_id, utc_now
from sparrow.events import EventHub
from sparrow.store import ChainStore, Database


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


async def timed(fn: Callable[[], Awaitable[object]], repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        await fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


async def main(depth: int, repeat: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        db = Database(Path(tmp) / "bench.db")
        await db.open()
        store = ChainStore(db, EventHub())
        started = time.perf_counter()
        chain_id, spine, siblings = await build(store, depth)
        print(
            f"built a chain of {2 * depth - 1} nodes, spine depth {depth}, "
            f"in {time.perf_counter() - started:.2f} s"
        )

        result = await store.spine(chain_id)
        assert [n.id for n in result] == [n.id for n in spine], "spine order is wrong"

        async def walk() -> None:
            node_id: str | None = spine[-1].id
            while node_id is not None:
                node = await store.get_node(node_id)
                assert node is not None
                node_id = node.parent_id

        async def move_tail() -> None:
            for tail in (siblings[-1], spine[-1]):
                async with store.write() as w:
                    await w.commit_path(tail.id, chain_id)

        t_scan = await timed(lambda: store.list_nodes(chain_id), repeat)
        t_spine = await timed(lambda: store.spine(chain_id), repeat)
        t_ids = await timed(lambda: store.spine_ids(chain_id), repeat)
        t_walk = await timed(walk, max(1, repeat // 10))
        t_commit = await timed(move_tail, max(1, repeat // 2)) / 2
        await db.close()

    rows = [
        ("scan (baseline)", t_scan, 2 * depth - 1),
        ("spine CTE", t_spine, depth),
        ("spine CTE, ids only", t_ids, depth),
        ("walk, one query per level", t_walk, depth),
        ("commit at the tail", t_commit, depth),
    ]
    print(f"\n{'operation':<28}{'rows':>8}{'ms':>10}{'× scan':>9}")
    for name, seconds, n in rows:
        print(f"{name:<28}{n:>8}{seconds * 1e3:>10.2f}{seconds / t_scan:>9.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    asyncio.run(main(args.depth, args.repeat))
