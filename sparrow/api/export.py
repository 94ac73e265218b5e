"""Export of the spine: ``POST /api/chains/{chain_id}/export`` (SPEC §2, §6)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from sparrow.api.deps import CallerDep, Exports
from sparrow.api.errors import responses
from sparrow.api.files import serve_file
from sparrow.api.schemas import ExportIn
from sparrow.audio.join import MEDIA_TYPES
from sparrow.domain.export import ExportFile

router = APIRouter(tags=["export"])


def export_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    content = {t: {"schema": {"type": "string", "format": "binary"}} for t in MEDIA_TYPES.values()}
    return {
        200: {"description": "The file, as an attachment.", "content": content},
        **responses(*statuses),
    }


def attachment(request: Request, made: ExportFile) -> Response:
    return serve_file(
        request,
        made.file,
        etag=f'"{made.key}"',
        media_type=made.media_type,
        filename=made.filename,
        disposition="attachment",
    )


@router.post(
    "/chains/{chain_id}/export",
    summary="The spine as one audio file",
    description="Joins the spine's nodes, root first, with one FFmpeg process: every segment "
    "is brought to the highest sample rate among them (MP3: at most 48 kHz) and to stereo if "
    "any is stereo, and each join is an equal-power crossfade of `crossfade_ms` (0: end to "
    "end). The length is exactly the sum of the segments minus one crossfade per join. "
    "WAV and FLAC are 24-bit when a segment is, else 16-bit; MP3 is LAME VBR. The same spine "
    "and options reuse the file already made. With `loudness_lufs` the mix is measured "
    "(EBU R128, FFmpeg's ebur128) and encoded with the gain that brings it within 1 LU of "
    "that loudness, under a true-peak limiter at -1 dBTP. 422 when the spine is longer than "
    "SPARROW_MAX_EXPORT_S or a segment is shorter than the crossfade needs.",
    response_class=Response,
    responses=export_responses(404, 409),
)
async def export_chain(
    chain_id: str, body: ExportIn, request: Request, exports: Exports, caller: CallerDep
) -> Response:
    made = await exports.spine(
        caller,
        chain_id,
        format=body.format,
        crossfade_ms=body.crossfade_ms,
        loudness_lufs=body.loudness_lufs,
    )
    return attachment(request, made)
