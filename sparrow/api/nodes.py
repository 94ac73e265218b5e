"""Node routes: read, branch, cancel, commit, uncommit, discard, audio and waveform peaks."""

from __future__ import annotations

import json
from typing import Annotated, Any

import anyio
from fastapi import Query, Request, Response

from sparrow.api.deps import CallerDep, Chains, Generation, Reads
from sparrow.api.errors import responses
from sparrow.api.files import CACHE_CONTROL, etag_matches, serve_file
from sparrow.api.routing import ModelJSON, api_router
from sparrow.api.schemas import (
    BranchIn,
    BranchOut,
    Discarded,
    NodeOut,
    Peaks,
    SpineChange,
    SpineOut,
)
from sparrow.audio import compute_peaks
from sparrow.audio.integrity import OpenedFile

router = api_router("nodes")

MAX_SAMPLES_PER_PIXEL = 2**24


@router.get(
    "/nodes/{node_id}", summary="One node", responses=responses(404), response_model=NodeOut
)
async def get_node(node_id: str, reads: Reads) -> ModelJSON:
    return ModelJSON(NodeOut.of(await reads.chains.get_node(reads.caller, node_id)))


@router.post(
    "/nodes/{parent_id}/branch",
    status_code=202,
    summary="Generate sibling continuations of a ready node",
    description="Creates `count` continuation nodes under the parent (or one per entry of "
    "`prompts`), all `queued`, and queues one job that generates them as one batch. Each "
    "is conditioned on the last `context_s` seconds of the path root→parent and on its "
    "text prompt (`prompt` for all, or its own from `prompts`); each node's `params` "
    "record the settings and its own seed. Follow their progress on the chain's "
    "event stream. 409 if the parent is not ready; 429 with `Retry-After` when the "
    "queue is full.",
    responses=responses(404, 409, 422, 429),
)
async def branch_node(
    parent_id: str, body: BranchIn, generation: Generation, caller: CallerDep
) -> BranchOut:
    nodes = await generation.branch(caller, parent_id, body.request())
    return BranchOut(nodes=[NodeOut.of(n) for n in nodes])


@router.post(
    "/nodes/{node_id}/cancel",
    summary="Cancel a queued or generating node",
    description="The node becomes `cancelled` now; a running batch stops within one "
    "decoding step once none of its nodes is wanted. Idempotent; 409 for a node that "
    "is ready or failed.",
    responses=responses(404, 409),
)
async def cancel_node(node_id: str, generation: Generation, caller: CallerDep) -> NodeOut:
    return NodeOut.of(await generation.cancel(caller, node_id))


@router.post(
    "/nodes/{node_id}/commit",
    summary="Commit a ready node and its ancestors",
    description="Any other committed branch that diverges from the path root→node is "
    "uncommitted; the node's committed descendants stay. Idempotent.",
    responses=responses(404, 409),
)
async def commit_node(node_id: str, chains: Chains, caller: CallerDep) -> SpineChange:
    return SpineChange(spine=SpineOut.of(await chains.commit(caller, node_id)))


@router.post(
    "/nodes/{node_id}/uncommit",
    summary="Uncommit a node and its committed descendants",
    description="The root cannot be uncommitted (409). Idempotent.",
    responses=responses(404, 409),
)
async def uncommit_node(node_id: str, chains: Chains, caller: CallerDep) -> SpineChange:
    return SpineChange(spine=SpineOut.of(await chains.uncommit(caller, node_id)))


@router.post(
    "/nodes/{node_id}/discard",
    summary="Delete a node, its subtree and their files",
    description="The root and committed nodes cannot be discarded (409).",
    responses=responses(404, 409),
)
async def discard_node(node_id: str, chains: Chains, caller: CallerDep) -> Discarded:
    return Discarded(deleted=await chains.discard(caller, node_id))


_WAV = {"content": {"audio/wav": {"schema": {"type": "string", "format": "binary"}}}}


WAV_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "The whole file.", **_WAV},
    206: {"description": "The requested byte range.", **_WAV},
    304: {"description": "Not modified (the ETag matched)."},
    **responses(404, 409, 416),
}

_AUDIO_ROUTE = {
    "path": "/nodes/{node_id}/audio",
    "summary": "The node's audio as WAV",
    "description": "Supports `Range` (206), `If-None-Match` (304) and `HEAD`. "
    "409 while the node is not ready.",
    "response_class": Response,
    "responses": WAV_RESPONSES,
}


@router.get(**_AUDIO_ROUTE)  # type: ignore[arg-type]
@router.head(**_AUDIO_ROUTE, name="head_node_audio")  # type: ignore[arg-type]
async def node_audio(node_id: str, request: Request, chains: Chains, caller: CallerDep) -> Response:
    node, opened = await chains.audio_file(caller, node_id)
    return serve_file(
        request,
        opened,
        etag=f'"{node.audio_sha256}"',
        media_type="audio/wav",
        filename=f"{node.id}.wav",
    )


PixelsPerSecond = Annotated[int | None, Query(ge=1, le=192_000)]
SamplesPerPixel = Annotated[int | None, Query(ge=2, le=MAX_SAMPLES_PER_PIXEL)]

PEAKS_ROUTE: dict[str, Any] = {
    "summary": "Waveform peaks (BBC audiowaveform JSON v2, 8-bit)",
    "response_model": Peaks,
    "description": "For wavesurfer.js and peaks.js. Give `pixels_per_second` (samples per "
    "pixel = sample rate // pixels per second, as audiowaveform computes it) or "
    "`samples_per_pixel` (default: 256). Channels are merged into one unless "
    "`split_channels=true`.",
    "responses": {304: {"description": "Not modified (the ETag matched)."}, **responses(404, 409)},
}


async def peaks_response(
    request: Request, opened: OpenedFile, identity: str, spp: int, split_channels: bool
) -> Response:
    """The peaks of the WAV held open (and closed here), with an ETag made of what decides
    them: the audio's ``identity`` and the zoom."""
    with opened:
        etag = f'"{identity}-{spp}-{int(split_channels)}"'
        headers = {"ETag": etag, "Cache-Control": CACHE_CONTROL}
        if etag_matches(request, etag):
            return Response(status_code=304, headers=headers)

        def render() -> bytes:
            # In a worker thread; the size is bounded by ``samples_per_pixel_for``.
            peaks = compute_peaks(opened.path, samples_per_pixel=spp, split_channels=split_channels)
            return json.dumps(peaks, separators=(",", ":")).encode()

        body = await anyio.to_thread.run_sync(render)
    return Response(body, media_type="application/json", headers=headers)


@router.get("/nodes/{node_id}/peaks", **PEAKS_ROUTE)
async def node_peaks(
    node_id: str,
    request: Request,
    chains: Chains,
    caller: CallerDep,
    pixels_per_second: PixelsPerSecond = None,
    samples_per_pixel: SamplesPerPixel = None,
    split_channels: bool = False,
) -> Response:
    node, opened, spp = await chains.peaks_source(
        caller,
        node_id,
        pixels_per_second=pixels_per_second,
        samples_per_pixel=samples_per_pixel,
        split_channels=split_channels,
    )
    return await peaks_response(request, opened, node.audio_sha256 or "", spp, split_channels)
