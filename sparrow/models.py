"""Sparrow's plain values: chains, nodes, stems, jobs and their lifecycles.

The bottom layer: every other module may import it, and it imports none of them.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any


class NodeKind(StrEnum):
    UPLOAD = "upload"
    CONTINUATION = "continuation"


class NodeStatus(StrEnum):
    QUEUED = "queued"
    GENERATING = "generating"
    READY = "ready"
    ERROR = "error"
    CANCELLED = "cancelled"


# The lifecycle (SPEC §1): queued → generating → ready | error | cancelled, and a
# queued node may be cancelled or fail before it starts. No other transitions.
TRANSITIONS: dict[NodeStatus, frozenset[NodeStatus]] = {
    NodeStatus.QUEUED: frozenset({NodeStatus.GENERATING, NodeStatus.CANCELLED, NodeStatus.ERROR}),
    NodeStatus.GENERATING: frozenset({NodeStatus.READY, NodeStatus.ERROR, NodeStatus.CANCELLED}),
    NodeStatus.READY: frozenset(),
    NodeStatus.ERROR: frozenset(),
    NodeStatus.CANCELLED: frozenset(),
}

ACTIVE = frozenset({NodeStatus.QUEUED, NodeStatus.GENERATING})


def sources_of(status: NodeStatus) -> frozenset[NodeStatus]:
    """The statuses a node may move to ``status`` from."""
    return frozenset(s for s, targets in TRANSITIONS.items() if status in targets)


class StemsStatus(StrEnum):
    QUEUED = "queued"
    SEPARATING = "separating"
    READY = "ready"
    ERROR = "error"
    CANCELLED = "cancelled"


# A node's stems: queued → separating → ready | error | cancelled, like a node; a
# separation that failed or was cancelled may be asked for again (back to queued).
STEMS_TRANSITIONS: dict[StemsStatus, frozenset[StemsStatus]] = {
    StemsStatus.QUEUED: frozenset(
        {StemsStatus.SEPARATING, StemsStatus.CANCELLED, StemsStatus.ERROR}
    ),
    StemsStatus.SEPARATING: frozenset(
        {StemsStatus.READY, StemsStatus.ERROR, StemsStatus.CANCELLED}
    ),
    StemsStatus.READY: frozenset(),
    StemsStatus.ERROR: frozenset({StemsStatus.QUEUED}),
    StemsStatus.CANCELLED: frozenset({StemsStatus.QUEUED}),
}

STEMS_ACTIVE = frozenset({StemsStatus.QUEUED, StemsStatus.SEPARATING})


def stems_sources_of(status: StemsStatus) -> frozenset[StemsStatus]:
    """The statuses a node's stems may move to ``status`` from."""
    return frozenset(s for s, targets in STEMS_TRANSITIONS.items() if status in targets)


def new_id() -> str:
    """A random, URL-safe identifier (128 bits)."""
    return secrets.token_hex(16)


def utc_now() -> str:
    """The current time as an ISO 8601 UTC string with milliseconds."""
    return iso_utc(datetime.now(UTC))


def iso_utc(moment: datetime) -> str:
    """A UTC moment as the ISO 8601 string with milliseconds that rows record."""
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class NodeError:
    code: str
    detail: str


@dataclass(frozen=True)
class Chain:
    id: str
    title: str
    root_node_id: str
    created_at: str
    updated_at: str
    owner: str | None = None
    last_event_id: int = 0


@dataclass(frozen=True)
class Node:
    id: str
    chain_id: str
    parent_id: str | None
    kind: NodeKind
    status: NodeStatus
    committed: bool
    created_at: str
    updated_at: str
    duration_s: float | None = None
    sample_rate: int | None = None
    channels: int | None = None
    frames: int | None = None
    prompt: str | None = None
    params: dict[str, Any] | None = None
    error: NodeError | None = None
    audio_sha256: str | None = None
    job_id: str | None = None
    from_s: float | None = None
    """The point of the parent this node continues from (None: a root)."""
    analysis: dict[str, Any] | None = None
    """Tempo, key and loudness (``sparrow.domain.analysis``), once computed."""

    @property
    def is_root(self) -> bool:
        return self.parent_id is None


@dataclass(frozen=True)
class Played:
    """One node of a path as the path plays it: its first ``frames`` frames."""

    node: Node
    frames: int
    offset_s: float
    """Where it starts in the path, in seconds."""

    @property
    def play_s(self) -> float:
        return self.frames / self.node.sample_rate if self.node.sample_rate else 0.0


def played(path: Sequence[Node]) -> list[Played]:
    """The path root→node as it plays (SPEC §12): every node up to the point where its
    child on the path begins (its ``from_s``, to the nearest frame), the last one whole.

    The one rule for the audio of a path: the context a branch continues, the spine,
    its export, its stems and its audio all read it from here.
    """
    out: list[Played] = []
    offset = 0.0
    for node, child in zip(path, [*path[1:], None], strict=True):
        frames = node.frames or 0
        if child is not None and child.from_s is not None and node.sample_rate:
            frames = min(frames, max(1, round(child.from_s * node.sample_rate)))
        out.append(Played(node, frames, offset))
        offset += out[-1].play_s
    return out


@dataclass(frozen=True)
class Spine:
    """The committed path as it plays, root first (``played``)."""

    entries: list[Played]

    @property
    def duration_s(self) -> float:
        return sum(e.play_s for e in self.entries)

    @classmethod
    def of(cls, nodes: list[Node]) -> Spine:
        return cls(played(nodes))


class JobKind(StrEnum):
    GENERATE = "generate"
    STEMS = "stems"


@dataclass(frozen=True)
class Job:
    """Work for the worker: a row from the request until the job ends."""

    id: str
    chain_id: str
    kind: JobKind
    request: dict[str, Any]
    created_at: str
    owner: str | None = None
    started_at: str | None = None
    attempts: int = 0  # times a worker started it


@dataclass(frozen=True)
class Stems:
    """The separation of one node into stems (``STEM_NAMES``), and where it stands."""

    node_id: str
    chain_id: str
    status: StemsStatus
    created_at: str
    updated_at: str
    job_id: str | None = None
    model: str | None = None
    sample_rate: int | None = None
    channels: int | None = None
    frames: int | None = None
    files: dict[str, str] | None = None  # stem name → sha256 of its WAV, once ready
    error: NodeError | None = None


class Tier(StrEnum):
    FREE = "free"
    PAID = "paid"


@dataclass(frozen=True)
class ApiKey:
    """An API key as stored: everything but the key itself (only its hash is kept)."""

    id: str
    name: str
    tier: Tier
    created_at: str


@dataclass(frozen=True)
class Caller:
    """Who is asking: the owner whose chains they may see, and what their tier allows.

    ``owner`` is the API key's id. With auth off there is one local user who sees
    everything: ``owner`` is None and every feature is open.
    """

    owner: str | None
    tier: Tier

    @property
    def paid(self) -> bool:
        return self.tier is Tier.PAID


LOCAL_USER = Caller(owner=None, tier=Tier.PAID)


@dataclass(frozen=True)
class Sampling:
    """The settings the siblings of a branch share, from the request to the engine.

    Validated once at the edge (``sparrow.api.schemas.BranchIn``), recorded in each
    node's ``params`` with ``to_json`` and read back with ``from_json``; the
    defaults are written here only.
    """

    duration_s: float = 10.0
    """Seconds of new audio per node."""
    context_s: float = 10.0
    """Seconds of the path root→parent the branch continues."""
    temperature: float = 1.0
    top_k: int = 250
    """0: off."""
    top_p: float = 0.0
    """0: off."""
    cfg_coef: float = 3.0
    """Classifier-free guidance; 1: off."""

    def to_json(self) -> dict[str, Any]:
        return {
            "duration_s": self.duration_s,
            "context_s": self.context_s,
            "temperature": self.temperature,
            "top_k": self.top_k,
            "top_p": self.top_p,
            "cfg_coef": self.cfg_coef,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Sampling:
        """The settings recorded in a node's ``params`` (its other keys are ignored)."""
        return cls(
            duration_s=float(data["duration_s"]),
            context_s=float(data["context_s"]),
            temperature=float(data["temperature"]),
            top_k=int(data["top_k"]),
            top_p=float(data["top_p"]),
            cfg_coef=float(data["cfg_coef"]),
        )
