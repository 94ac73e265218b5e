"""Response and request bodies, as the OpenAPI document shows them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from sparrow.domain.models import Chain, Node, NodeKind, NodeStatus, Spine


class ErrorOut(BaseModel):
    error: str = Field(description="Stable machine-readable code, e.g. `not_found`.")
    detail: str = Field(description="A human sentence saying what went wrong.")


class NodeErrorOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    code: str
    detail: str


class ChainOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    title: str
    created_at: str
    updated_at: str
    root_node_id: str

    @classmethod
    def of(cls, chain: Chain) -> ChainOut:
        return cls.model_validate(chain)


class NodeOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    chain_id: str
    parent_id: str | None
    kind: NodeKind
    status: NodeStatus
    committed: bool
    duration_s: float | None = Field(description="Exact duration: frames / sample_rate.")
    sample_rate: int | None
    channels: int | None
    frames: int | None = Field(description="Sample frames per channel.")
    prompt: str | None
    params: dict[str, Any] | None = Field(
        description="Generation settings, including the seed used; null for uploads."
    )
    error: NodeErrorOut | None
    created_at: str
    updated_at: str

    @classmethod
    def of(cls, node: Node) -> NodeOut:
        return cls.model_validate(node)


class ChainCreated(BaseModel):
    chain: ChainOut
    root: NodeOut


class ChainList(BaseModel):
    items: list[ChainOut]
    total: int


class ChainDetail(BaseModel):
    chain: ChainOut
    nodes: list[NodeOut]


class ChainPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    title: str = Field(
        description="At most 200 characters once control characters become spaces and "
        "runs of spaces collapse; not empty."
    )


class SpineEntryOut(BaseModel):
    node: NodeOut
    offset_s: float = Field(description="Where the node starts on the spine, in seconds.")


class SpineOut(BaseModel):
    nodes: list[SpineEntryOut]
    duration_s: float

    @classmethod
    def of(cls, spine: Spine) -> SpineOut:
        return cls(
            nodes=[
                SpineEntryOut(node=NodeOut.of(e.node), offset_s=round(e.offset_s, 6))
                for e in spine.entries
            ],
            duration_s=round(spine.duration_s, 6),
        )


class SpineChange(BaseModel):
    spine: SpineOut


class Discarded(BaseModel):
    deleted: list[str] = Field(description="Ids of the deleted nodes, parents first.")


class Peaks(BaseModel):
    """BBC audiowaveform JSON, version 2."""

    version: Literal[2]
    channels: int
    sample_rate: int
    samples_per_pixel: int
    bits: Literal[8]
    length: int = Field(description="Number of pixels.")
    data: list[int] = Field(
        description="min, max per pixel (per channel, interleaved, when split)."
    )


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready", "not_ready"]
    checks: dict[str, bool]
