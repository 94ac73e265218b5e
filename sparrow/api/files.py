"""Serving immutable files: ETag revalidation, HEAD, and byte ranges.

Starlette's ``FileResponse`` does ranges and HEAD; this adds ``If-None-Match``
(304), serves a file held open since it was checked (a discard racing the
download cannot break it), and answers range errors the way the rest of the
API does: a malformed ``Range`` is ignored (RFC 9110 allows it) and an
unsatisfiable one gets a JSON 416 with ``Content-Range: bytes */size``.
"""

from __future__ import annotations

from typing import Any, Literal

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    MalformedRangeHeader,
    RangeNotSatisfiable,
    Response,
)
from starlette.types import Receive, Scope, Send

from sparrow.audio.integrity import OpenedFile
from sparrow.errors import RangeNotSatisfiable as RangeOutsideFile

CACHE_CONTROL = "private, max-age=86400"


class _RangeAwareFileResponse(FileResponse):
    def __init__(self, file: OpenedFile, **options: Any) -> None:
        super().__init__(file.path, stat_result=file.stat, **options)
        self.file = file

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self._serve(scope, receive, send)
        finally:
            self.file.close()

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        http_range = Headers(scope=scope).get("range")
        if http_range is not None:
            size = self.file.stat.st_size
            try:
                self._parse_range_header(http_range, size)
            except MalformedRangeHeader:
                scope = {
                    **scope,
                    "headers": [(k, v) for k, v in scope["headers"] if k.lower() != b"range"],
                }
            except RangeNotSatisfiable as exc:
                # Rendered by the API's error handler (the response has not started).
                raise RangeOutsideFile(
                    f"The file has {size} bytes; the requested range is outside it.", size
                ) from exc
        await super().__call__(scope, receive, send)


def etag_matches(request: Request, etag: str) -> bool:
    header = request.headers.get("if-none-match")
    if header is None:
        return False
    candidates = {tag.strip().removeprefix("W/") for tag in header.split(",")}
    return "*" in candidates or etag in candidates


def serve_file(
    request: Request,
    file: OpenedFile,
    *,
    etag: str,
    media_type: str,
    filename: str | None = None,
    disposition: Literal["inline", "attachment"] = "inline",
) -> Response:
    """A 200/206/304 response for an immutable file identified by ``etag`` (quoted),
    served from ``file`` (held open since it was checked) and closing it."""
    headers = {"ETag": etag, "Cache-Control": CACHE_CONTROL}
    if etag_matches(request, etag):
        file.close()
        return Response(status_code=304, headers=headers)
    try:
        return _RangeAwareFileResponse(
            file,
            media_type=media_type,
            headers=headers,
            filename=filename,
            content_disposition_type=disposition,
        )
    except BaseException:
        file.close()
        raise
