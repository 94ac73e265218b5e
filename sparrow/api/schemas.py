"""Response and request bodies, as the OpenAPI document shows them."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)

from sparrow.audio.join import MAX_CROSSFADE_MS, ExportFormat
from sparrow.audio.loudness import MAX_LUFS, MIN_LUFS
from sparrow.domain.chains import TITLE_MAX, TITLE_PATTERN
from sparrow.domain.generation import MAX_SEED, MIN_BRANCH_S, BranchRequest
from sparrow.domain.stems import StemsView
from sparrow.engines.base import STEM_NAMES, EngineInfo
from sparrow.models import Chain, Node, NodeKind, NodeStatus, Sampling, Spine, StemsStatus

DEFAULT_SAMPLING = Sampling()
MAX_PROMPT_CHARS = 2000

TITLE_DESCRIPTION = (
    f"At most {TITLE_MAX} characters, not blank; control characters become spaces and runs "
    "of white space collapse."
)
# The domain checks titles (sparrow.domain.chains.given_title), with a sentence for each rule.
TITLE_SCHEMA: dict[str, Any] = {
    "type": "string",
    "maxLength": TITLE_MAX,
    "pattern": TITLE_PATTERN,
    "description": TITLE_DESCRIPTION,
}


def integral(value: object) -> object:
    """JSON Schema counts 3.0 as an integer: accept it as 3 (strict models refuse floats)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Integer = Annotated[int, BeforeValidator(integral)]


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
    last_event_id: int = Field(
        description="Id of the chain's latest event: open the event stream with "
        "`?last_event_id=` set to it to receive exactly what happens after this read."
    )

    @classmethod
    def of(cls, chain: Chain) -> ChainOut:
        return cls.model_validate(chain)


class AnalysisOut(BaseModel):
    tempo_bpm: float | None = Field(description="Beats per minute; null where none can be told.")
    key: str | None = Field(description='Like "C major" or "A minor"; null where none can be told.')
    loudness_lufs: float | None = Field(
        description="Integrated loudness (EBU R128); null for silence."
    )
    true_peak_dbtp: float | None = Field(description="True peak (EBU R128); null for silence.")


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
    from_s: float | None = Field(
        description="The point of the parent this node continues from; null for a root."
    )
    analysis: AnalysisOut | None = Field(
        description="Tempo, key and loudness; null until computed, a few seconds after the "
        "node is ready (announced by a `node-analysis` event)."
    )
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
    title: str = Field(json_schema_extra=TITLE_SCHEMA)


class SpineEntryOut(BaseModel):
    node: NodeOut
    offset_s: float = Field(description="Where the node starts on the spine, in seconds.")
    play_s: float = Field(
        description="The seconds of the node that play: up to where its child on the spine "
        "begins (the child's `from_s`), all of it for the last node."
    )


class SpineOut(BaseModel):
    nodes: list[SpineEntryOut]
    duration_s: float = Field(description="The sum of the entries' `play_s`.")

    @classmethod
    def of(cls, spine: Spine) -> SpineOut:
        return cls(
            nodes=[
                SpineEntryOut(
                    node=NodeOut.of(e.node),
                    offset_s=round(e.offset_s, 6),
                    play_s=round(e.play_s, 6),
                )
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


class BranchIn(BaseModel):
    """A branch request. Ranges that depend on the server's limits (``duration_s`` up
    to ``SPARROW_MAX_BRANCH_S``, ``count`` up to ``SPARROW_MAX_COUNT``) answer 422."""

    # Strict: "2" or true is not a count; JSON integers are still fine for floats.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)

    prompt: str = Field(
        default="",
        max_length=MAX_PROMPT_CHARS,
        description="Text describing the music, for every sibling.",
    )
    prompts: list[Annotated[str, StringConstraints(max_length=MAX_PROMPT_CHARS)]] | None = Field(
        default=None,
        min_length=1,
        description="One text per sibling, instead of `prompt`: one node per prompt, all "
        "in one batch, each node's `prompt` its own. At most SPARROW_MAX_COUNT (8); "
        "`count`, if given, must equal their number.",
    )
    from_s: float | None = Field(
        default=None,
        gt=0,
        description="The point of the parent, in seconds, to continue from (at most the "
        "parent's duration); the parent's end if omitted.",
    )
    duration_s: float = Field(
        default=DEFAULT_SAMPLING.duration_s,
        ge=MIN_BRANCH_S,
        description="Seconds of new audio per node; at most SPARROW_MAX_BRANCH_S (120).",
    )
    count: Integer = Field(
        default=1,
        ge=1,
        description="Sibling alternatives, generated as one batch; at most SPARROW_MAX_COUNT (8).",
    )
    context_s: float = Field(
        default=DEFAULT_SAMPLING.context_s,
        ge=0,
        le=30,
        description="Seconds of the path root→parent to continue.",
    )
    temperature: float = Field(default=DEFAULT_SAMPLING.temperature, ge=0.01, le=10)
    top_k: Integer = Field(
        default=DEFAULT_SAMPLING.top_k, ge=0, le=10_000, description="0 disables top-k."
    )
    top_p: float = Field(
        default=DEFAULT_SAMPLING.top_p, ge=0, le=1, description="0 disables top-p."
    )
    cfg_coef: float = Field(
        default=DEFAULT_SAMPLING.cfg_coef,
        ge=1,
        le=30,
        description="Classifier-free guidance; 1 turns it off.",
    )
    # The bounds go before the validator: after it, pydantic writes them into the document
    # as ``ge``/``le``, words JSON Schema does not know.
    seed: Annotated[int, Field(ge=0, le=MAX_SEED), BeforeValidator(integral)] | None = Field(
        default=None,
        description="Seed of the first sibling; sibling i gets seed + i. Random if omitted.",
    )
    match_loudness: bool = Field(
        default=True,
        description="Bring each continuation to the integrated loudness of the audio it "
        "continues (EBU R128, within 1 LU), true peak at most -1 dBTP; recorded in `params`.",
    )

    @model_validator(mode="after")
    def _one_way_to_prompt(self) -> BranchIn:
        if self.prompts is None:
            return self
        if "prompt" in self.model_fields_set:
            raise ValueError("give either prompt (for every sibling) or prompts (one each)")
        if "count" in self.model_fields_set and self.count != len(self.prompts):
            raise ValueError(
                f"count is {self.count} but there are {len(self.prompts)} prompts; "
                "leave count out or make them agree"
            )
        return self

    def request(self) -> BranchRequest:
        """The request as the domain takes it: validated here, carried typed from here on."""
        return BranchRequest(
            prompt=self.prompt,
            count=len(self.prompts) if self.prompts is not None else self.count,
            prompts=tuple(self.prompts) if self.prompts is not None else None,
            seed=self.seed,
            from_s=self.from_s,
            sampling=Sampling(
                duration_s=self.duration_s,
                context_s=self.context_s,
                temperature=self.temperature,
                top_k=self.top_k,
                top_p=self.top_p,
                cfg_coef=self.cfg_coef,
            ),
            match_loudness=self.match_loudness,
        )


class BranchOut(BaseModel):
    nodes: list[NodeOut] = Field(description="The new nodes, all `queued`.")


class RunningJobOut(BaseModel):
    job_id: str
    kind: str
    chain_id: str
    node_ids: list[str]
    progress: float
    started_at: str | None


class BatchRowOut(BaseModel):
    job_id: str
    node_id: str
    progress: float = Field(description="Of this row, 0..1.")
    decoding: bool = Field(description="In the batch now; false: waiting for room in it.")


class BatchOut(BaseModel):
    max_rows: int = Field(description="SPARROW_MAX_BATCH: rows decoded as one batch at most.")
    rows: list[BatchRowOut] = Field(
        description="This process's generation rows, one per node: those decoding, then those "
        "waiting to join, the caller's only with auth on. With PostgreSQL, an API replica "
        "decodes nothing; each worker's jobs are in `running`."
    )


class EngineOut(BaseModel):
    engine: str = Field(description="Generation: `musicgen` or `mock`; stems: `demucs` or `mock`.")
    model: str
    device: str
    dtype: str | None
    loaded: bool
    decoder: str | None = Field(
        description="MusicGen's decoding loop: `sparrow` or `transformers` (null otherwise)."
    )
    decoder_check: str | None = Field(
        default=None,
        description="On CUDA, the check at load that Sparrow's loop gives transformers' greedy "
        "tokens: `passed`, or `not used: <why>` (the engine then decodes with `generate`); "
        "null where it did not run.",
    )

    @classmethod
    def of(cls, info: EngineInfo) -> EngineOut:
        return cls(
            engine=info.engine,
            model=info.model,
            device=info.device,
            dtype=info.dtype,
            loaded=info.loaded,
            decoder=info.extra.get("decoder"),
            decoder_check=info.extra.get("decoder_check"),
        )


class WorkerOut(BaseModel):
    id: str = Field(description="`local` for the worker inside this server (SQLite).")
    host: str
    device: str
    engine: str
    model: str
    loaded: bool = Field(description="Whether its generation model is loaded.")
    running: bool = Field(description="Whether it is running a job now.")


class GpuOut(BaseModel):
    generation: EngineOut
    stems: EngineOut
    vram_total_bytes: int | None = Field(description="Null when the device is not a GPU.")
    vram_used_bytes: int | None
    queue_depth: int = Field(description="Jobs waiting, of every owner.")
    running: list[RunningJobOut] = Field(
        description="The running jobs (with PostgreSQL, every worker's; progress as of its "
        "last heartbeat) that are the caller's: with auth on, other keys' jobs are not shown."
    )
    batch: BatchOut
    workers: list[WorkerOut] = Field(
        description="Every live worker: this server's own, or with PostgreSQL every "
        "`sparrow worker` of the cluster (and a server's with SPARROW_WORKER=on)."
    )


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready", "not_ready"]
    checks: dict[str, bool] = Field(
        description="`database`, `storage` (the data dir), `ffmpeg` and `worker`: passed?"
    )
    problems: dict[str, str] = Field(
        default_factory=dict, description="Why each failing check failed."
    )


class StemsOut(BaseModel):
    node_id: str
    chain_id: str
    status: StemsStatus | None = Field(description="Null: stems were never asked for.")
    progress: float | None = Field(description="0..1 while separating; 1 once ready.")
    error: NodeErrorOut | None
    model: str | None
    sample_rate: int | None = Field(description="The stems' rate (Demucs: 44100).")
    channels: int | None
    frames: int | None = Field(
        description="Frames per stem: the node's duration at the stems' rate."
    )
    urls: dict[str, str] = Field(
        description="Once ready: each stem's WAV (`drums`, `bass`, `other`, `vocals`)."
    )

    @classmethod
    def of(cls, view: StemsView) -> StemsOut:
        stems, node = view.stems, view.node
        ready = stems is not None and stems.status is StemsStatus.READY
        return cls(
            node_id=node.id,
            chain_id=node.chain_id,
            status=stems.status if stems else None,
            progress=None if view.progress is None else round(view.progress, 4),
            error=NodeErrorOut.model_validate(stems.error) if stems and stems.error else None,
            model=stems.model if stems else None,
            sample_rate=stems.sample_rate if stems else None,
            channels=stems.channels if stems else None,
            frames=stems.frames if stems else None,
            urls={n: f"/api/nodes/{node.id}/stems/{n}" for n in STEM_NAMES} if ready else {},
        )


class SpineStemsOut(BaseModel):
    chain_id: str
    ready: bool = Field(description="Whether every spine node's stems are ready.")
    nodes: list[StemsOut] = Field(description="The spine's nodes, root first.")
    urls: dict[str, str] = Field(
        description="Once ready: each stem of the whole spine, joined as the export joins "
        "the mix (`?format=wav|mp3|flac&crossfade_ms=20`)."
    )

    @classmethod
    def of(cls, chain_id: str, views: list[StemsView]) -> SpineStemsOut:
        nodes = [StemsOut.of(v) for v in views]
        ready = bool(nodes) and all(n.status is StemsStatus.READY for n in nodes)
        urls = {n: f"/api/chains/{chain_id}/stems/{n}" for n in STEM_NAMES} if ready else {}
        return cls(chain_id=chain_id, ready=ready, nodes=nodes, urls=urls)


class ExportIn(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)

    format: ExportFormat = Field(default="wav", description="`wav`, `mp3` or `flac`.")
    crossfade_ms: float = Field(
        default=20,
        ge=0,
        le=MAX_CROSSFADE_MS,
        description="Equal-power crossfade at each join, in milliseconds; 0 joins end to end.",
    )
    loudness_lufs: float | None = Field(
        default=None,
        ge=MIN_LUFS,
        le=MAX_LUFS,
        description="Integrated loudness the file is brought to (EBU R128, -40 to -5 LUFS), "
        "true peak at most -1 dBTP; null keeps the mix as it is.",
    )


class StreamToken(BaseModel):
    token: str | None = Field(
        description="Pass as `?token=` to the event stream; null with auth off."
    )
    expires_in_s: int | None


# -- the event stream's payloads (each event's `data:` is one of these, as JSON) -----------


class NodeStatusData(BaseModel):
    node_id: str
    chain_id: str
    status: NodeStatus
    error: NodeErrorOut | None = Field(default=None, description="Present when `error`.")


class ProgressData(BaseModel):
    node_id: str
    chain_id: str
    progress: float = Field(ge=0, le=1)
    eta_s: float | None = Field(default=None, description="Seconds left, when known.")


class NodeAnalysisData(BaseModel):
    node_id: str
    chain_id: str
    analysis: AnalysisOut


class NodeIdsData(BaseModel):
    chain_id: str
    node_ids: list[str] = Field(description="The deleted nodes.")


class SpineChangedData(BaseModel):
    chain_id: str
    node_ids: list[str] = Field(description="The nodes whose `committed` changed.")
    committed: list[str] = Field(
        description="Those of them now committed (ancestors first); the others were uncommitted."
    )


class ChainData(BaseModel):
    chain_id: str


class StemsStatusData(BaseModel):
    node_id: str
    chain_id: str
    status: StemsStatus
    error: NodeErrorOut | None = Field(default=None, description="Present when `error`.")
    stems: list[str] | None = Field(default=None, description="The stems' names, once ready.")


class ResetData(BaseModel):
    chain_id: str
    last_event_id: int = Field(description="Resume from here after reloading the chain.")


class ShutdownData(BaseModel):
    reason: str


EVENT_DATA: dict[str, type[BaseModel]] = {
    "node-status": NodeStatusData,
    "node-progress": ProgressData,
    "node-analysis": NodeAnalysisData,
    "node-deleted": NodeIdsData,
    "spine-changed": SpineChangedData,
    "stems-status": StemsStatusData,
    "stems-progress": ProgressData,
    "chain-deleted": ChainData,
    "reset": ResetData,
    "shutdown": ShutdownData,  # the last event of a stream, without an id
}
