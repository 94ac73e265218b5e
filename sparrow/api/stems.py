"""Stem routes (a paid feature): separate a node or the whole spine, follow it, download.

POST /api/nodes/{id}/stems            queue the node's separation (202; 200 if already there)
GET  /api/nodes/{id}/stems            status, progress and the stems' URLs
POST /api/nodes/{id}/stems/cancel     cancel a queued or running separation
GET  /api/nodes/{id}/stems/{stem}     one stem, WAV (Range, ETag, HEAD)
POST /api/chains/{id}/stems           queue every spine node that has no stems yet
GET  /api/chains/{id}/stems           the spine's stems, node by node
GET  /api/chains/{id}/stems/{stem}    one stem of the whole spine, joined like the export
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from fastapi import Query, Request, Response
from starlette.convertors import Convertor, register_url_convertor

from sparrow.api.deps import CallerDep, Exports, StemsDep
from sparrow.api.errors import responses
from sparrow.api.export import attachment, export_responses
from sparrow.api.files import serve_file
from sparrow.api.routing import api_router
from sparrow.api.schemas import SpineStemsOut, StemsOut
from sparrow.audio.join import MAX_CROSSFADE_MS, ExportFormat
from sparrow.engines.base import STEM_NAMES

router = api_router("stems")

Stem = StrEnum("Stem", {name: name for name in STEM_NAMES})  # type: ignore[misc]


class StemConvertor(Convertor[str]):
    """``{stem:stem}`` matches only a stem's name, so ``…/stems/cancel`` is not a stem: an
    unknown stem is 404 like any unknown path, and 405 answers name only real methods."""

    regex = "|".join(STEM_NAMES)

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("stem", StemConvertor())

_ASYNC = "Follow it on the chain's event stream (`stems-status`, `stems-progress`)."


@router.post(
    "/nodes/{node_id}/stems",
    status_code=202,
    summary="Separate a ready node into stems (paid tier)",
    description="Queues a Demucs separation into `drums`, `bass`, `other` and `vocals`: 202 "
    "with the stems `queued`. Stems already queued, separating or ready are returned as they "
    f"are, with 200; failed or cancelled ones are queued again. {_ASYNC}",
    responses={
        200: {"model": StemsOut, "description": "Already there."},
        **responses(402, 404, 409, 429),
    },
)
async def request_node_stems(
    node_id: str, response: Response, stems: StemsDep, caller: CallerDep
) -> StemsOut:
    view, queued = await stems.request(caller, node_id)
    response.status_code = 202 if queued else 200
    return StemsOut.of(view)


@router.get(
    "/nodes/{node_id}/stems",
    summary="A node's stems: status, progress and URLs (paid tier)",
    responses=responses(402, 404),
)
async def get_node_stems(node_id: str, stems: StemsDep, caller: CallerDep) -> StemsOut:
    return StemsOut.of(await stems.view(caller, node_id))


@router.post(
    "/nodes/{node_id}/stems/cancel",
    summary="Cancel a queued or running separation (paid tier)",
    description="Idempotent; 409 when the stems are ready, failed or were never asked for.",
    responses=responses(402, 404, 409),
)
async def cancel_node_stems(node_id: str, stems: StemsDep, caller: CallerDep) -> StemsOut:
    return StemsOut.of(await stems.cancel(caller, node_id))


_WAV = {"content": {"audio/wav": {"schema": {"type": "string", "format": "binary"}}}}

_STEM_ROUTE = {
    "path": "/nodes/{node_id}/stems/{stem:stem}",
    "summary": "One stem of a node, WAV (paid tier)",
    "description": "Supports `Range` (206), `If-None-Match` (304) and `HEAD`. 409 until the "
    "stems are ready.",
    "response_class": Response,
    "responses": {
        200: {"description": "The whole file.", **_WAV},
        206: {"description": "The requested byte range.", **_WAV},
        304: {"description": "Not modified (the ETag matched)."},
        **responses(402, 404, 409, 416),
    },
}


@router.get(**_STEM_ROUTE)  # type: ignore[arg-type]
@router.head(**_STEM_ROUTE, name="head_node_stem")  # type: ignore[arg-type]
async def node_stem(
    node_id: str, stem: Stem, request: Request, stems: StemsDep, caller: CallerDep
) -> Response:
    found, opened = await stems.stem_file(caller, node_id, stem.value)
    return serve_file(
        request,
        opened,
        etag=f'"{(found.files or {})[stem.value]}"',
        media_type="audio/wav",
        filename=f"{node_id}-{stem.value}.wav",
    )


@router.post(
    "/chains/{chain_id}/stems",
    status_code=202,
    summary="Separate every node of the spine (paid tier)",
    description="Queues one job separating each spine node whose stems are not ready or on "
    "their way (202); 200 when there is nothing to queue. Once every node's stems are ready, "
    f"`urls` gives each stem of the whole spine. {_ASYNC}",
    responses={
        200: {"model": SpineStemsOut, "description": "Nothing to queue."},
        **responses(402, 404, 429),
    },
)
async def request_spine_stems(
    chain_id: str, response: Response, stems: StemsDep, caller: CallerDep
) -> SpineStemsOut:
    views, queued = await stems.request_spine(caller, chain_id)
    response.status_code = 202 if queued else 200
    return SpineStemsOut.of(chain_id, views)


@router.get(
    "/chains/{chain_id}/stems",
    summary="The stems of the spine's nodes (paid tier)",
    responses=responses(402, 404),
)
async def get_spine_stems(chain_id: str, stems: StemsDep, caller: CallerDep) -> SpineStemsOut:
    return SpineStemsOut.of(chain_id, await stems.spine_view(caller, chain_id))


@router.get(
    "/chains/{chain_id}/stems/{stem:stem}",
    summary="One stem of the whole spine, as one file (paid tier)",
    description="The stem of every spine node, joined exactly as `POST …/export` joins the "
    "mix (same crossfades, so the four stems line up with the export). 409 until every "
    "spine node's stems are ready. Made once per spine and options, then reused.",
    response_class=Response,
    responses=export_responses(402, 404, 409),
)
async def spine_stem(
    chain_id: str,
    stem: Stem,
    request: Request,
    exports: Exports,
    caller: CallerDep,
    format: ExportFormat = "wav",
    crossfade_ms: Annotated[float, Query(ge=0, le=MAX_CROSSFADE_MS)] = 20,
) -> Response:
    made = await exports.spine_stem(
        caller, chain_id, stem.value, format=format, crossfade_ms=crossfade_ms
    )
    return attachment(request, made)
