"""The spine invariant under any sequence of commit, uncommit, discard and branch.

A Hypothesis state machine drives ``ChainService`` over a real database and
compares every step with a plain-Python model of SPEC §1: once over a fresh
SQLite file per example, once over a real PostgreSQL database (each example works
on a chain of its own there).
"""

from __future__ import annotations

import asyncio
import itertools
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from pg import PostgresServer

from sparrow.domain.chains import ChainService
from sparrow.errors import Conflict, NotFound
from sparrow.events import EventHub
from sparrow.jobs import LocalQueue
from sparrow.media import MediaStore
from sparrow.models import LOCAL_USER, Chain, Node, NodeKind, NodeStatus, new_id, utc_now
from sparrow.settings import Settings
from sparrow.store import ChainStore, ChainWriter, Database
from sparrow.store.postgres import PostgresDatabase
from sparrow.store.sqlite import SqliteDatabase

T = TypeVar("T")


def make_node(chain_id: str, parent_id: str | None, status: NodeStatus) -> Node:
    now = utc_now()
    return Node(
        id=new_id(),
        chain_id=chain_id,
        parent_id=parent_id,
        kind=NodeKind.UPLOAD if parent_id is None else NodeKind.CONTINUATION,
        status=status,
        committed=parent_id is None,
        duration_s=1.5 if status is NodeStatus.READY else None,
        sample_rate=32000,
        channels=1,
        frames=48000 if status is NodeStatus.READY else None,
        created_at=now,
        updated_at=now,
    )


class SpineMachine(RuleBasedStateMachine):
    database_url: ClassVar[str | None] = None  # None: SQLite

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.tmp = Path(tempfile.mkdtemp(prefix="sparrow-spine-"))
        self.db: Database = (
            SqliteDatabase(self.tmp / "sparrow.db")
            if self.database_url is None
            else PostgresDatabase(self.database_url, pool_size=2)
        )
        self.run(self.db.open())
        media = MediaStore(self.tmp)
        media.ensure()
        self.store = ChainStore(self.db, EventHub())
        self.service = ChainService(
            self.store, media, Settings(data_dir=self.tmp), jobs=LocalQueue()
        )
        # The model: parent, status and committed flag of every live node.
        self.parent: dict[str, str | None] = {}
        self.status: dict[str, NodeStatus] = {}
        self.committed: set[str] = set()
        self.chain_id = new_id()
        root = make_node(self.chain_id, None, NodeStatus.READY)
        now = utc_now()
        chain = Chain(self.chain_id, "t", root.id, now, now)
        self.run(self._write(lambda w: w.create_chain(chain, root)))
        self.root = root.id
        self._add(root)
        self.committed.add(root.id)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    async def _write(self, action: Callable[[ChainWriter], Awaitable[None]]) -> None:
        async with self.store.write() as w:
            await action(w)

    def teardown(self) -> None:
        self.run(self.db.close())
        self.loop.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _add(self, node: Node) -> None:
        self.parent[node.id] = node.parent_id
        self.status[node.id] = node.status

    def _subtree(self, node_id: str) -> set[str]:
        found = {node_id}
        grew = True
        while grew:
            more = {n for n, p in self.parent.items() if p in found} - found
            grew = bool(more)
            found |= more
        return found

    def _ancestors(self, node_id: str) -> set[str]:
        path: set[str] = set()
        current: str | None = node_id
        while current is not None:
            path.add(current)
            current = self.parent[current]
        return path

    def _pick(self, data: st.DataObject) -> str:
        # Insertion order, not ids: ids are random, positions replay the same.
        return data.draw(st.sampled_from(list(self.parent)))

    @rule(data=st.data(), status=st.sampled_from([*NodeStatus, NodeStatus.READY, NodeStatus.READY]))
    def branch(self, data: st.DataObject, status: NodeStatus) -> None:
        # As the API does: new continuations only ever hang under a ready node.
        ready = [n for n, s in self.status.items() if s is NodeStatus.READY]
        parent = data.draw(st.sampled_from(ready))
        node = make_node(self.chain_id, parent, status)
        self.run(self._write(lambda w: w.insert_nodes([node])))
        self._add(node)

    @rule(data=st.data())
    def commit(self, data: st.DataObject) -> None:
        node_id = self._pick(data)
        if self.status[node_id] is not NodeStatus.READY:
            with pytest.raises(Conflict):
                self.run(self.service.commit(LOCAL_USER, node_id))
            return
        self.run(self.service.commit(LOCAL_USER, node_id))
        path = self._ancestors(node_id)
        keep = self.committed & self._subtree(node_id)  # committed descendants stay
        self.committed = path | keep

    @rule(data=st.data())
    def uncommit(self, data: st.DataObject) -> None:
        node_id = self._pick(data)
        if node_id == self.root:
            with pytest.raises(Conflict):
                self.run(self.service.uncommit(LOCAL_USER, node_id))
            return
        self.run(self.service.uncommit(LOCAL_USER, node_id))
        self.committed -= self._subtree(node_id)

    @rule(data=st.data())
    def discard(self, data: st.DataObject) -> None:
        node_id = self._pick(data)
        if node_id == self.root or node_id in self.committed:
            with pytest.raises(Conflict):
                self.run(self.service.discard(LOCAL_USER, node_id))
            return
        deleted = self.run(self.service.discard(LOCAL_USER, node_id))
        gone = self._subtree(node_id)
        assert set(deleted) == gone
        assert deleted[0] == node_id
        for n in gone:
            del self.parent[n]
            del self.status[n]
        with pytest.raises(NotFound):
            self.run(self.service.get_node(LOCAL_USER, node_id))

    @invariant()
    def database_matches_model(self) -> None:
        nodes = self.run(self.store.list_nodes(self.chain_id))
        assert {n.id for n in nodes} == set(self.parent)
        assert {n.id for n in nodes if n.committed} == self.committed

    @invariant()
    def committed_nodes_form_one_path_from_the_root(self) -> None:
        spine = self.run(self.service.spine(LOCAL_USER, self.chain_id))
        ids = [e.node.id for e in spine.entries]
        assert ids[0] == self.root
        assert set(ids) == self.committed  # every committed node is on the one path
        for parent, child in itertools.pairwise(ids):
            assert self.parent[child] == parent
        assert all(e.node.status is NodeStatus.READY for e in spine.entries)
        offsets = [e.offset_s for e in spine.entries]
        assert offsets == sorted(offsets)
        assert spine.duration_s == pytest.approx(1.5 * len(ids))


class PostgresSpineMachine(SpineMachine):
    def __init__(self) -> None:
        assert self.database_url is not None, "the PostgreSQL machine would test SQLite"
        super().__init__()
        assert self.db.kind == "postgresql"


@pytest.fixture(scope="module")
def _postgres_spine(postgres: PostgresServer) -> None:
    PostgresSpineMachine.database_url = postgres.new_database()


SpineMachine.TestCase.settings = settings(
    max_examples=80,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestSpineRules = SpineMachine.TestCase
PostgresSpineMachine.TestCase.settings = settings(SpineMachine.TestCase.settings, max_examples=40)
TestSpineRulesOnPostgres = pytest.mark.usefixtures("_postgres_spine")(PostgresSpineMachine.TestCase)
