"""The spine as one file: ``POST /api/chains/{chain_id}/export`` (SPEC §2, §6), and the
spine as it plays, ``GET …/spine/audio`` and ``…/spine/peaks`` (SPEC §12)."""

from __future__ import annotations

from typing import Any

from fastapi import Request, Response

from sparrow.api.deps import CallerDep, Exports
from sparrow.api.errors import responses
from sparrow.api.files import serve_file
from sparrow.api.nodes import (
    PEAKS_ROUTE,
    WAV_RESPONSES,
    PixelsPerSecond,
    SamplesPerPixel,
    peaks_response,
)
from sparrow.api.routing import api_router
from sparrow.api.schemas import ExportIn
from sparrow.audio.join import MEDIA_TYPES
from sparrow.domain.chains import samples_per_pixel_for
from sparrow.domain.export import ExportFile

router = api_router("export")


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


_SPINE_AUDIO_ROUTE: dict[str, Any] = {
    "path": "/chains/{chain_id}/spine/audio",
    "summary": "The spine as it plays, as one WAV",
    "description": "Every spine node up to where its child on the spine begins, end to end "
    "(no crossfade): a node starts at its `offset_s`, and the file lasts the spine's "
    "`duration_s`. The same bytes as the WAV export with `crossfade_ms` 0, made once per "
    "spine and reused. Supports `Range` (206), `If-None-Match` (304) and `HEAD`; the ETag "
    "changes with the spine.",
    "response_class": Response,
    "responses": WAV_RESPONSES,
}


@router.get(**_SPINE_AUDIO_ROUTE)
@router.head(**_SPINE_AUDIO_ROUTE, name="head_spine_audio")
async def spine_audio(
    chain_id: str, request: Request, exports: Exports, caller: CallerDep
) -> Response:
    made = (await exports.spine_audio(caller, chain_id)).export
    return serve_file(
        request, made.file, etag=f'"{made.key}"', media_type="audio/wav", filename=made.filename
    )


@router.get("/chains/{chain_id}/spine/peaks", **PEAKS_ROUTE)
async def spine_peaks(
    chain_id: str,
    request: Request,
    exports: Exports,
    caller: CallerDep,
    pixels_per_second: PixelsPerSecond = None,
    samples_per_pixel: SamplesPerPixel = None,
    split_channels: bool = False,
) -> Response:
    """The peaks of ``GET …/spine/audio``, in the node peaks' format and parameters."""
    audio = await exports.spine_audio(caller, chain_id)
    try:
        spp = samples_per_pixel_for(
            audio.layout.sample_rate,
            audio.layout.frames,
            audio.layout.channels,
            pixels_per_second=pixels_per_second,
            samples_per_pixel=samples_per_pixel,
            split_channels=split_channels,
        )
    except BaseException:
        audio.export.file.close()
        raise
    return await peaks_response(request, audio.export.file, audio.export.key, spp, split_channels)
