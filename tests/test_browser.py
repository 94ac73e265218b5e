"""A real headless Chromium follows a chain's event stream from another origin.

The page is served by a second local HTTP server on another port, so the browser
makes a cross-origin ``EventSource`` request and enforces CORS on it the way an
editor on its own dev server would meet it. The page reports what it receives
back to its own server, where the test reads it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from helpers import SAMPLE
from live import free_port, running_server

from sparrow.settings import Settings

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Chromium's start and its first page: seconds on an idle machine, far more on two
# cores that the rest of the suite keeps busy (a bound on a wait, not a speed check).
FIRST_PAGE_S = 30
# As root on a machine with a closed network (see the machine notes): no sandbox,
# and no background connections to Google's hosts.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

# The page: one EventSource with credentials (so the browser insists on the exact
# origin in Access-Control-Allow-Origin), every callback reported to its own server.
PAGE = b"""<!doctype html>
<meta charset="utf-8">
<title>sparrow events</title>
<script>
const q = new URLSearchParams(location.search);
const token = q.get("token") ? "?token=" + encodeURIComponent(q.get("token")) : "";
const url = q.get("api") + "/api/chains/" + encodeURIComponent(q.get("chain")) + "/events" + token;
let seq = 0;
function report(kind, extra) {
  fetch("/report", {
    method: "POST",
    headers: {"Content-Type": "application/json"},
    body: JSON.stringify({origin: location.origin, kind: kind, seq: seq++, ...extra}),
  });
}
if (q.get("frame")) {  // headless Chromium opens one page: other origins go in frames
  const frame = document.createElement("iframe");
  frame.src = q.get("frame");
  document.documentElement.appendChild(frame);
}
const es = new EventSource(url, {withCredentials: true});
es.onopen = () => report("open", {});
es.onerror = () => report("error", {ready_state: es.readyState});
es.addEventListener("node-status", (e) => report("node-status", {
  last_event_id: e.lastEventId, origin_of_event: e.origin, data: JSON.parse(e.data),
}));
</script>
"""


class Reports:
    """What the pages reported, from any page server's thread."""

    def __init__(self) -> None:
        self._items: list[dict[str, Any]] = []
        self._changed = threading.Condition()

    def add(self, item: dict[str, Any]) -> None:
        with self._changed:
            self._items.append(item)
            self._changed.notify_all()

    def of(self, origin: str) -> list[dict[str, Any]]:
        with self._changed:
            return sorted((r for r in self._items if r["origin"] == origin), key=lambda r: r["seq"])

    def wait(self, what: str, until: Callable[[], bool], timeout_s: float) -> None:
        """Until ``until()`` holds, checked at each report and at least every 0.1 s."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while not until():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out waiting for {what}; reports: {self._items}")
                self._changed.wait(min(left, 0.1))


@contextmanager
def page_server(reports: Reports) -> Iterator[str]:
    """Serve ``PAGE`` and take ``POST /report`` on a port of its own; yields its origin."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if not self.path.startswith("/page"):
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(PAGE)))
            self.end_headers()
            self.wfile.write(PAGE)

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length)
            if self.path == "/report":
                reports.add(json.loads(body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass  # quiet: pytest shows stderr of failures only, and this is noise

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@contextmanager
def chromium(url: str, profile: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Headless Chromium with ``url`` open; always killed, with its children, at the end."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", url],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: renderers go with it
        )
    try:
        yield proc
    finally:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        finally:
            # whatever is left of its group (a lingering child, or all of it): killed
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def test_browser_follows_node_status_from_another_origin(tmp_path: Path) -> None:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"Chromium is not installed ({CHROMIUM}); apt-get install chromium")
    reports = Reports()
    with page_server(reports) as allowed, page_server(reports) as refused:
        settings = Settings(
            data_dir=tmp_path / "data", engine="mock", mock_step_ms=5, cors_origins=allowed
        )
        with running_server(settings) as api, httpx.Client(base_url=api, timeout=10) as client:
            created = client.post(
                "/api/chains",
                files={"file": (SAMPLE.name, SAMPLE.read_bytes(), "application/octet-stream")},
            )
            assert created.status_code == 201, created.text
            chain_id, root_id = created.json()["chain"]["id"], created.json()["root"]["id"]
            events_path = f"/api/chains/{chain_id}/events"

            # The headers a browser decides on, as the server sends them on the stream.
            for origin, expected in ((allowed, allowed), (refused, None)):
                with client.stream("GET", events_path, headers={"Origin": origin}) as head:
                    assert head.status_code == 200
                    assert head.headers.get("access-control-allow-origin") == expected
                    if expected:
                        assert head.headers["access-control-allow-credentials"] == "true"

            query = urlencode({"api": api, "chain": chain_id})
            frame = f"{refused}/page?{query}"
            url = f"{allowed}/page?{urlencode({'api': api, 'chain': chain_id, 'frame': frame})}"
            log = tmp_path / "chromium.log"
            with chromium(url, tmp_path / "profile", log) as proc:

                def kinds(origin: str) -> list[str]:
                    if proc.poll() is not None:
                        raise AssertionError(f"Chromium exited: {log.read_text()[-2000:]}")
                    return [r["kind"] for r in reports.of(origin)]

                def opened() -> bool:
                    if kinds(allowed)[:1] == ["error"]:
                        raise AssertionError("the browser refused the stream of a listed origin")
                    return "open" in kinds(allowed) and "error" in kinds(refused)

                reports.wait(
                    "the allowed page's stream to open and the refused page's to fail",
                    opened,
                    timeout_s=FIRST_PAGE_S,
                )
                # Opened before the branch: every event of the new nodes arrives live.
                branched = client.post(
                    f"/api/nodes/{root_id}/branch",
                    json={"count": 2, "duration_s": 1.0, "seed": 1},
                )
                assert branched.status_code == 202, branched.text
                node_ids = {n["id"] for n in branched.json()["nodes"]}
                assert len(node_ids) == 2

                def ready() -> set[str]:
                    kinds(allowed)  # fails fast if Chromium died
                    return {
                        r["data"]["node_id"]
                        for r in reports.of(allowed)
                        if r["kind"] == "node-status" and r["data"]["status"] == "ready"
                    }

                def complete() -> bool:
                    # reports travel on concurrent fetches: wait for any still on the way
                    seqs = [r["seq"] for r in reports.of(allowed)]
                    return seqs == list(range(len(seqs)))

                reports.wait(
                    "every node ready",
                    lambda: ready() >= node_ids and complete(),
                    timeout_s=10,
                )

                # The refused origin's stream failed for good: closed, no reconnection.
                refused_reports = reports.of(refused)
                assert [r["kind"] for r in refused_reports] == ["error"], refused_reports
                assert refused_reports[0]["ready_state"] == 2  # EventSource.CLOSED

            # Outside the browser block: the pages are gone, what they sent is final.
            seen = [r for r in reports.of(allowed) if r["kind"] == "node-status"]
            kinds_seen = [r["kind"] for r in reports.of(allowed)]
            assert kinds_seen == ["open"] + ["node-status"] * len(seen), kinds_seen  # no error
            ids = [int(r["last_event_id"]) for r in seen]
            assert ids == sorted(ids) and len(set(ids)) == len(ids), ids  # in order, once each
            assert {r["origin_of_event"] for r in seen} == {api}
            for node_id in node_ids:
                statuses = [r["data"]["status"] for r in seen if r["data"]["node_id"] == node_id]
                assert statuses == ["queued", "generating", "ready"], (node_id, statuses)
            assert {r["data"]["chain_id"] for r in seen} == {chain_id}
            assert {r["data"]["node_id"] for r in seen} == node_ids


def test_browser_follows_a_stream_with_a_token_when_auth_is_on(tmp_path: Path) -> None:
    """EventSource cannot send Authorization: with auth on it opens the stream with a
    stream token in the URL; the same page without one is refused."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"Chromium is not installed ({CHROMIUM}); apt-get install chromium")
    reports = Reports()
    with page_server(reports) as with_token, page_server(reports) as without:
        settings = Settings(
            data_dir=tmp_path / "data",
            engine="mock",
            mock_step_ms=5,
            auth="on",
            cors_origins=f"{with_token},{without}",
        )
        created = subprocess.run(
            [sys.executable, "-m", "sparrow", "keys", "create", "--tier", "free"],
            env={**os.environ, "SPARROW_DATA_DIR": str(settings.data_dir)},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        key = created.stdout.strip().splitlines()[-1]
        headers = {"Authorization": f"Bearer {key}"}
        with (
            running_server(settings) as api,
            httpx.Client(base_url=api, timeout=10, headers=headers) as client,
        ):
            chain = client.post(
                "/api/chains",
                files={"file": (SAMPLE.name, SAMPLE.read_bytes(), "application/octet-stream")},
            ).json()
            chain_id, root_id = chain["chain"]["id"], chain["root"]["id"]
            issued = client.post(f"/api/chains/{chain_id}/stream-token")
            assert issued.status_code == 200, issued.text
            token = issued.json()["token"]
            frame = f"{without}/page?{urlencode({'api': api, 'chain': chain_id})}"
            page = {"api": api, "chain": chain_id, "token": token, "frame": frame}
            log = tmp_path / "chromium.log"
            with chromium(f"{with_token}/page?{urlencode(page)}", tmp_path / "p", log) as proc:

                def kinds(origin: str) -> list[str]:
                    if proc.poll() is not None:
                        raise AssertionError(f"Chromium exited: {log.read_text()[-2000:]}")
                    return [r["kind"] for r in reports.of(origin)]

                reports.wait(
                    "the stream with a token to open and the one without to fail",
                    lambda: "open" in kinds(with_token) and "error" in kinds(without),
                    timeout_s=FIRST_PAGE_S,
                )
                branched = client.post(f"/api/nodes/{root_id}/branch", json={"duration_s": 0.5})
                [node_id] = [n["id"] for n in branched.json()["nodes"]]
                reports.wait(
                    "the node ready on the token's stream",
                    lambda: any(
                        r["kind"] == "node-status" and r["data"]["status"] == "ready"
                        for r in reports.of(with_token)
                    ),
                    timeout_s=10,
                )
            statuses = [
                r["data"]["status"]
                for r in reports.of(with_token)
                if r["kind"] == "node-status" and r["data"]["node_id"] == node_id
            ]
            assert statuses == ["queued", "generating", "ready"]
            assert [r["kind"] for r in reports.of(without)] == ["error"]
