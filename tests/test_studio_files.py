"""The studio's files as the server ships them, without a browser: the page, its
headers, every file it loads, and the vendored library against the lockfile."""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from pathlib import Path

import httpx
import pytest
from helpers import authed_app

from sparrow.api.studio import FILES

pytestmark = pytest.mark.anyio

STUDIO = FILES.parent
ROOT = STUDIO.parent.parent


def referenced(text: str) -> set[str]:
    """The paths a page or module loads: src/href attributes and ES module imports."""
    attributes = re.findall(r'(?:src|href)="(/studio/[^"]+)"', text)
    imports = re.findall(r'^import .* from "\./([^"]+)";', text, flags=re.MULTILINE)
    return {*attributes, *(f"/studio/{name}" for name in imports)}


async def test_the_page_and_everything_it_loads_are_served(client: httpx.AsyncClient) -> None:
    page = await client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert 'data-auth="off"' in page.text
    policy = page.headers["content-security-policy"]
    assert "script-src 'self';" in policy and "connect-src 'self'" in policy
    assert page.headers["cache-control"] == "no-cache"

    seen: set[str] = set()
    todo = referenced(page.text)
    while todo:
        path = todo.pop()
        seen.add(path)
        answer = await client.get(path)
        assert answer.status_code == 200, path
        assert answer.headers["content-security-policy"] == policy
        assert "etag" in answer.headers
        if path.endswith(".js"):
            assert answer.headers["content-type"].startswith("text/javascript")
            todo |= referenced(answer.text) - seen
    assert {"/studio/studio.js", "/studio/vendor/wavesurfer.esm.js"} <= seen
    assert (await client.head("/")).status_code == 200


async def test_the_page_knows_when_auth_is_on(tmp_path: Path) -> None:
    async with authed_app(tmp_path, {}) as (_, client, _tokens):
        page = await client.get("/")  # no key needed for the page itself
        assert page.status_code == 200 and 'data-auth="on"' in page.text
        assert (await client.get("/studio/studio.js")).status_code == 200


@pytest.mark.parametrize(
    "path", ["/studio/nope.js", "/studio/../pyproject.toml", "/studio/%2e%2e/api/studio.py"]
)
async def test_nothing_else_is_served_from_the_studio(client: httpx.AsyncClient, path: str) -> None:
    answer = await client.get(path)
    assert answer.status_code == 404
    assert answer.json()["error"] == "not_found"


def test_the_vendored_library_is_the_locked_one() -> None:
    pinned = json.loads((STUDIO / "package.json").read_text())["dependencies"]
    locked = json.loads((STUDIO / "package-lock.json").read_text())["packages"]
    vendored = json.loads((FILES / "vendor" / "vendored.json").read_text())
    assert set(vendored) == set(pinned)
    for name, record in vendored.items():
        assert record["version"] == pinned[name] == locked[f"node_modules/{name}"]["version"]
        for file, digest in record["sha256"].items():
            assert hashlib.sha256((FILES / "vendor" / file).read_bytes()).hexdigest() == digest
        assert any(f.endswith("LICENSE") for f in record["sha256"]), "its licence ships with it"


def test_every_studio_file_is_package_data() -> None:
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["sparrow"]
    package = STUDIO.parent
    shipped = {
        p for glob in globs for p in package.glob(glob) if p.is_file()
    }  # as setuptools globs
    files = {p for p in FILES.rglob("*") if p.is_file()}
    assert files and files - shipped == set()
