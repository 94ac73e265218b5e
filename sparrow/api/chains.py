"""Chain routes: create from an upload, list, read, rename, delete, spine."""

from __future__ import annotations

from typing import Annotated

import anyio
from fastapi import Query, Request, Response

from sparrow.api.deps import CallerDep, Chains, Reads
from sparrow.api.errors import responses
from sparrow.api.routing import ModelJSON, api_router
from sparrow.api.schemas import (
    TITLE_SCHEMA,
    ChainCreated,
    ChainDetail,
    ChainList,
    ChainOut,
    ChainPatch,
    NodeOut,
    SpineOut,
)
from sparrow.api.upload import receive_upload

router = api_router("chains")

_UPLOAD_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file"],
                "properties": {
                    "file": {
                        "type": "string",
                        "format": "binary",
                        "description": "The clip: any audio FFmpeg decodes (WAV, MP3, FLAC, "
                        "OGG, M4A/AAC, AIFF, …), detected from its content.",
                    },
                    "title": TITLE_SCHEMA,
                },
                "additionalProperties": False,
            }
        }
    },
}


@router.post(
    "/chains",
    status_code=201,
    summary="Create a chain from an uploaded clip",
    description="The clip becomes the chain's root node, decoded to a canonical WAV and "
    "`ready` when this returns.",
    openapi_extra={"requestBody": _UPLOAD_BODY},
    responses=responses(408, 413, 415, 429, 503),
)
async def create_chain(
    request: Request, response: Response, chains: Chains, caller: CallerDep
) -> ChainCreated:
    # The slot is held until the decode is done: it bounds the files waiting in tmp/.
    with chains.uploads.hold():
        upload = await receive_upload(
            request,
            chains.new_upload_path(),
            max_file_bytes=chains.settings.max_upload_bytes,
            idle_timeout_s=chains.settings.upload_idle_timeout_s,
        )
        try:
            chain, root = await chains.create_from_upload(
                caller, upload.path, title=upload.fields.get("title"), filename=upload.filename
            )
        finally:
            await anyio.Path(upload.path).unlink(missing_ok=True)
    response.headers["Location"] = f"/api/chains/{chain.id}"
    return ChainCreated(chain=ChainOut.of(chain), root=NodeOut.of(root))


@router.get(
    "/chains",
    summary="List chains, newest first",
    responses=responses(),
    response_model=ChainList,
)
async def list_chains(
    reads: Reads,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=2**62)] = 0,
) -> ModelJSON:
    items, total = await reads.chains.list_chains(reads.caller, limit=limit, offset=offset)
    return ModelJSON(ChainList(items=[ChainOut.of(c) for c in items], total=total))


@router.get(
    "/chains/{chain_id}",
    summary="A chain with all its nodes",
    responses=responses(404),
    response_model=ChainDetail,
)
async def get_chain(chain_id: str, reads: Reads) -> ModelJSON:
    chain, nodes = await reads.chains.chain_with_nodes(reads.caller, chain_id)
    return ModelJSON(ChainDetail(chain=ChainOut.of(chain), nodes=[NodeOut.of(n) for n in nodes]))


@router.patch("/chains/{chain_id}", summary="Rename a chain", responses=responses(404))
async def rename_chain(
    chain_id: str, body: ChainPatch, chains: Chains, caller: CallerDep
) -> ChainOut:
    return ChainOut.of(await chains.rename(caller, chain_id, body.title))


@router.delete(
    "/chains/{chain_id}",
    status_code=204,
    summary="Delete a chain, its nodes and files",
    responses=responses(404),
)
async def delete_chain(chain_id: str, chains: Chains, caller: CallerDep) -> Response:
    await chains.delete(caller, chain_id)
    return Response(status_code=204)


@router.get(
    "/chains/{chain_id}/spine",
    summary="The committed path, root first",
    description="`offset_s` is where each node starts when the spine is played back to back.",
    responses=responses(404),
    response_model=SpineOut,
)
async def get_spine(chain_id: str, reads: Reads) -> ModelJSON:
    return ModelJSON(SpineOut.of(await reads.chains.spine(reads.caller, chain_id)))
