"""Sparrow Studio: the editor page at ``GET /`` and its files under ``/studio/``.

The page is plain files shipped inside the package (``sparrow/studio``): no
build step and nothing from another host, so it works on a machine without
internet. Its Content-Security-Policy says so to the browser too: scripts,
styles, media and requests come from this server only (audio plays from
``blob:`` URLs, fetched with the key when auth is on). See docs/studio.md.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import HTMLResponse
from starlette.staticfiles import StaticFiles
from starlette.types import Message, Receive, Scope, Send

from sparrow.api.deps import SettingsDep

FILES = Path(__file__).resolve().parent.parent / "studio" / "static"

# wavesurfer.js styles its shadow DOM with a <style> element: inline styles are allowed,
# inline scripts are not.
POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data: blob:",
        "media-src 'self' blob:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
HEADERS = {
    "Content-Security-Policy": POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
# Revalidated on every load (ETag / Last-Modified), so an upgraded server's page is
# never mixed with an older cached script.
CACHE = {"Cache-Control": "no-cache"}

_RAW_HEADERS = [(k.lower().encode(), v.encode()) for k, v in (HEADERS | CACHE).items()]

router = APIRouter(tags=["studio"])


@router.get(
    "/",
    summary="Sparrow Studio, the built-in editor page",
    description="An HTML page that uses this API from the browser: upload, branch, "
    "listen, commit, export and stems. Its scripts and styles are under `/studio/`.",
    response_class=HTMLResponse,
    responses={200: {"content": {"text/html": {}}, "description": "The page."}},
)
async def studio_page(settings: SettingsDep) -> HTMLResponse:
    # The page learns from its own markup whether to ask for a key, so that it never
    # has to provoke a 401 to find out.
    auth = "on" if settings.auth == "on" else "off"
    return HTMLResponse(_page().replace("{{auth}}", auth), headers=HEADERS | CACHE)


@cache
def _page() -> str:
    return (FILES / "index.html").read_text(encoding="utf-8")


class _StudioFiles(StaticFiles):
    """The page's scripts, styles and vendored libraries, with the page's headers."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *_RAW_HEADERS]
            await send(message)

        await super().__call__(scope, receive, with_headers)


def install_studio(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/studio", _StudioFiles(directory=FILES), name="studio")
