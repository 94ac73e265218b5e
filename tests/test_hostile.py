"""Hostile input against the real server: each request gets its documented 4xx (SPEC §6, §7).

One ``sparrow serve`` on 127.0.0.1 takes the whole corpus three times over: the
upload files of ``corpus.py`` (lying headers, conflicting chunks, truncated and
decoder-hostile files, zero and one byte), the same audio under wrong names and
part types, bodies over the limit with and without ``Content-Length``, lying
framing, garbage and absurd JSON, NaN and huge numbers, traversal-looking and
overlong ids, garbage ``Range`` and ``Last-Event-ID``. Every answer must be the
case's status with a JSON ``{error, detail}`` and never a 5xx; afterwards no
temporary file is left, only the accepted uploads are stored, the server's
memory did not grow from pass to pass, and it is still ready.

A very slow sender and a stalled one are tested beside it: the server keeps
answering others at once while they dribble.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from corpus import make_bad_uploads
from live import free_port, read_status, rss_mib, server_process

from sparrow.audio import render_music, write_wav
from sparrow.media import MediaStore

MAX_UPLOAD_MB = 1
IDLE_TIMEOUT_S = 1.0
PASSES = 3

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Case:
    name: str
    send: Callable[[httpx.Client], httpx.Response]
    status: int
    code: str | None = None  # None: any error code the status allows; 2xx cases have none


@dataclass
class Target:
    """What the cases aim at: a real chain, its ready root, and the server's address."""

    base: str
    port: int
    chain_id: str
    node_id: str
    clip: bytes  # one second of audio, accepted


# -- raw HTTP, for framing that httpx will not send ----------------------------------


def raw_exchange(port: int, request: bytes, *, timeout_s: float = 10) -> httpx.Response:
    """Send ``request`` bytes as they are; read the answer until the server closes or it
    is complete. Only the status line, the headers and a Content-Length body are parsed."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        with contextlib.suppress(OSError):  # the server may answer and close first (413)
            sock.sendall(request)
        data = b""
        deadline = time.monotonic() + timeout_s
        while b"\r\n\r\n" not in data or len(data) < _expected_length(data):
            assert time.monotonic() < deadline, f"no complete answer: {data!r}"
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = [(n, v) for n, _, v in (line.partition(": ") for line in lines[1:]) if v]
    return httpx.Response(int(lines[0].split(" ")[1]), headers=headers, content=body)


def _expected_length(data: bytes) -> int:
    head, sep, _ = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b": ")
        if name.lower() == b"content-length":
            return len(head) + len(sep) + int(value)
    return len(data)


def multipart(filename: str, content: bytes, part_type: str = "audio/wav") -> bytes:
    return (
        b"--b\r\n"
        + f'Content-Disposition: form-data; name="file"; filename="{filename}"\r\n'.encode()
        + f"Content-Type: {part_type}\r\n\r\n".encode()
        + content
        + b"\r\n--b--\r\n"
    )


def raw_post(target: Target, path: str, body: bytes, *headers: str) -> Callable[[Any], Any]:
    """A case's sender that POSTs ``body`` with exactly ``headers``, framing included."""
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\n" + "".join(h + "\r\n" for h in headers)
    return lambda _: raw_exchange(target.port, head.encode() + b"\r\n" + body)


# -- the corpus ---------------------------------------------------------------------------


def upload_cases(target: Target, folder: Path) -> Iterator[Case]:
    for bad in make_bad_uploads(folder):
        data = bad.path.read_bytes()
        yield Case(
            f"upload {bad.name}",
            lambda c, d=data, n=bad.path.name: c.post(  # type: ignore[misc]
                "/api/chains", files={"file": (n, d)}
            ),
            bad.status,
            bad.code,
        )
    clip = target.clip
    for name, filename, part_type, status in (
        ("traversal file name", "../../../etc/passwd", "audio/wav", 201),
        ("image part type", "cover.png", "image/png", 201),
        ("NUL in file name", "a\x00b.wav", "application/octet-stream", 201),
        ("overlong file name", "x" * 5000 + ".wav", "audio/wav", 422),  # a part header > 4 KiB
    ):
        yield Case(
            f"upload {name}",
            lambda c, f=filename, t=part_type: c.post(  # type: ignore[misc]
                "/api/chains", files={"file": (f, clip, t)}
            ),
            status,
        )
    big = bytes(MAX_UPLOAD_MB * 1_000_000 + 100_000)
    form = "Content-Type: multipart/form-data; boundary=b"
    yield Case(
        "oversize upload with Content-Length",
        raw_post(
            target,
            "/api/chains",
            multipart("a.wav", big),
            form,
            f"Content-Length: {len(big) + 150}",
        ),
        413,
        "payload_too_large",
    )
    chunked = multipart("a.wav", big)
    framed = b"".join(
        b"%x\r\n%s\r\n" % (len(chunked[i : i + 65536]), chunked[i : i + 65536])
        for i in range(0, len(chunked), 65536)
    )
    yield Case(
        "oversize upload, chunked",
        raw_post(
            target,
            "/api/chains",
            framed + b"0\r\n\r\n",
            form,
            "Transfer-Encoding: chunked",
        ),
        413,
        "payload_too_large",
    )
    yield Case(
        "upload body shorter than its Content-Length",
        raw_post(
            target,
            "/api/chains",
            multipart("a.wav", clip)[:-40],
            form,
            "Content-Length: 999999",
        ),
        408,
    )
    yield Case(
        "upload as JSON",
        lambda c: c.post("/api/chains", json={"file": "AAAA"}),
        422,
        "invalid_input",
    )
    yield Case(
        "unknown form field",
        lambda c: c.post("/api/chains", files={"audio": ("a.wav", clip)}),
        422,
        "invalid_input",
    )


def json_cases(target: Target) -> Iterator[Case]:
    branch = f"/api/nodes/{target.node_id}/branch"
    export = f"/api/chains/{target.chain_id}/export"
    chain = f"/api/chains/{target.chain_id}"
    bodies: list[tuple[str, str, bytes, int]] = [
        ("truncated JSON", branch, b'{"prompt": ', 422),
        ("JSON array", branch, b"[]", 422),
        ("JSON null", export, b"null", 422),
        ("JSON string", chain, b'"title"', 422),
        ("not UTF-8", branch, b'{"prompt": "\xff\xfe"}', 422),
        ("deeply nested", branch, b"[" * 50_000 + b"]" * 50_000, 413),
        ("nested under the limit", branch, b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", 422),
        ("NaN literal", branch, b'{"duration_s": NaN}', 422),
        ("Infinity literal", export, b'{"crossfade_ms": Infinity}', 422),
        ("1e309", branch, b'{"duration_s": 1e309}', 422),
        ("400-digit count", branch, b'{"count": 1' + b"0" * 400 + b"}", 422),
        ("negative duration", branch, b'{"duration_s": -1}', 422),
        ("count 0", branch, b'{"count": 0}', 422),
        ("count 1e9", branch, b'{"count": 1000000000}', 422),
        ("count as string", branch, b'{"count": "2"}', 422),
        ("count true", branch, b'{"count": true}', 422),
        ("count 2.5", branch, b'{"count": 2.5}', 422),
        ("seed -1", branch, b'{"seed": -1}', 422),
        ("seed 2**64", branch, b'{"seed": 18446744073709551616}', 422),
        ("top_p 2", branch, b'{"top_p": 2}', 422),
        ("context_s 31", branch, b'{"context_s": 31}', 422),
        ("unknown field", branch, b'{"prompt": "x", "steps": 5}', 422),
        ("duplicate keys", branch, b'{"count": 1, "count": 99}', 422),
        ("huge prompt", branch, json.dumps({"prompt": "x" * 60_000}).encode(), 422),
        ("crossfade -1", export, b'{"crossfade_ms": -1}', 422),
        ("crossfade 1e6", export, b'{"crossfade_ms": 1000000}', 422),
        ("format exe", export, b'{"format": "exe"}', 422),
        ("format path", export, b'{"format": "../../x"}', 422),
        ("blank title", chain, b'{"title": "  \\t\\n "}', 422),
        ("title of control characters", chain, b'{"title": "\\u0000\\u0001"}', 422),
        ("lone surrogate title", chain, b'{"title": "\\ud800"}', 422),
        ("201-character title", chain, json.dumps({"title": "t" * 201}).encode(), 422),
        ("65 KiB body", chain, json.dumps({"title": "t" * 70_000}).encode(), 413),
    ]
    for name, path, body, status in bodies:
        method = "PATCH" if path == chain else "POST"
        yield Case(
            f"{method} {name}",
            lambda c, m=method, p=path, b=body: c.request(  # type: ignore[misc]
                m, p, content=b, headers={"content-type": "application/json"}
            ),
            status,
        )
    yield Case(
        "JSON body with a lying Content-Length",
        raw_post(
            target,
            branch,
            b'{"count": 1}',
            "Content-Type: application/json",
            "Content-Length: 500",
        ),
        408,
        "request_timeout",
    )
    yield Case(
        "JSON body chunked past the limit",
        raw_post(
            target,
            branch,
            b"10000\r\n" + b" " * 65536 + b"\r\n" + b"10000\r\n" + b" " * 65536 + b"\r\n0\r\n\r\n",
            "Content-Type: application/json",
            "Transfer-Encoding: chunked",
        ),
        413,
        "payload_too_large",
    )


def id_and_header_cases(target: Target) -> Iterator[Case]:
    ids = [
        "..%2F..%2Fsparrow.db",
        "%2E%2E",
        "..%5C..%5Cwin.ini",
        "a%00b",
        "%F0%9F%8E%B5",
        "x" * 5000,
        "1%20OR%201%3D1",
        "'%3B--",
    ]
    for some_id in ids:
        for path in (
            f"/api/chains/{some_id}",
            f"/api/nodes/{some_id}/audio",
            f"/api/chains/{some_id}/events",
        ):
            shown = some_id if len(some_id) < 30 else some_id[:10] + "…"
            yield Case(
                f"GET {path.replace(some_id, shown)}",
                lambda c, p=path: c.get(p),  # type: ignore[misc]
                404,
                "not_found",
            )
    audio = f"/api/nodes/{target.node_id}/audio"
    for name, value, status in (
        ("Range past the end", "bytes=999999999-", 416),
        ("Range reversed (invalid, so ignored)", "bytes=100-10", 200),
        ("Range garbage", "bytes=abc", 200),
        ("Range of another unit", "items=0-10", 200),
        ("Range with 300 parts", "bytes=" + ",".join(["0-1"] * 300), 200),
    ):
        yield Case(
            name,
            lambda c, v=value: c.get(audio, headers={"range": v}),  # type: ignore[misc]
            status,
        )
    yield Case(
        "If-None-Match garbage",
        lambda c: c.get(audio, headers={"if-none-match": '"' + "z" * 4000}),
        200,
    )
    for name, query, status in (
        ("limit -1", "limit=-1", 422),
        ("limit 1e9", "limit=1000000000", 422),
        ("offset NaN", "offset=NaN", 422),
        ("limit 10**40", "limit=" + "9" * 40, 422),
    ):
        yield Case(
            f"list {name}",
            lambda c, q=query: c.get(f"/api/chains?{q}"),  # type: ignore[misc]
            status,
        )
    peaks = f"/api/nodes/{target.node_id}/peaks"
    for query in ("pixels_per_second=0", "pixels_per_second=NaN", "samples_per_pixel=-5",
                  "samples_per_pixel=1e30", "pixels_per_second=1&samples_per_pixel=2"):  # fmt: skip
        yield Case(
            f"peaks {query}",
            lambda c, q=query: c.get(f"{peaks}?{q}"),  # type: ignore[misc]
            422,
        )


def stream_cases(target: Target) -> Iterator[Case]:
    """Garbage and future ``Last-Event-ID``: the stream opens with ``reset`` (read, then cut)."""
    for cursor in ("abc", "-1", "99999999", "9" * 5000, "1e3", "0x10", ""):
        yield Case(
            f"Last-Event-ID {cursor[:12]!r}",
            lambda c, v=cursor: first_event(c, target.chain_id, v),  # type: ignore[misc]
            200,
        )


def first_event(client: httpx.Client, chain_id: str, cursor: str) -> httpx.Response:
    """Open the stream with ``cursor``, read up to its first event, and hang up."""
    with client.stream(
        "GET", f"/api/chains/{chain_id}/events", headers={"last-event-id": cursor}
    ) as response:
        seen = ""
        for line in response.iter_lines():
            seen += line + "\n"
            if line.startswith("data:"):
                break
    assert cursor in ("", "0") or "event: reset" in seen, seen
    return httpx.Response(response.status_code, text=seen)


# -- running it ------------------------------------------------------------------------


def check(case: Case, client: httpx.Client) -> None:
    response = case.send(client)
    assert response.status_code < 500, f"{case.name}: {response.status_code} {response.text}"
    assert response.status_code == case.status, (
        f"{case.name}: {response.status_code} {response.text[:300]}"
    )
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error", "detail"} and body["detail"], (case.name, body)
        assert "Traceback" not in body["detail"], case.name
        if case.code is not None:
            assert body["error"] == case.code, (case.name, body)


def test_the_corpus_gets_documented_4xx_and_leaves_nothing(tmp_path: Path) -> None:
    data_dir, port = tmp_path / "data", free_port()
    base = f"http://127.0.0.1:{port}"
    clip_path = tmp_path / "clip.wav"
    write_wav(clip_path, render_music(1.0, 22050, 1, seed=4), 22050)
    log = tmp_path / "server.log"
    env = {
        "SPARROW_ENGINE": "mock",
        "SPARROW_MAX_UPLOAD_MB": str(MAX_UPLOAD_MB),
        "SPARROW_MAX_UPLOAD_S": "2",
        "SPARROW_UPLOAD_IDLE_TIMEOUT_S": str(IDLE_TIMEOUT_S),
    }
    with (
        server_process(data_dir, port, log=log, **env) as proc,
        httpx.Client(base_url=base, timeout=30) as client,
    ):
        created = client.post("/api/chains", files={"file": ("c.wav", clip_path.read_bytes())})
        assert created.status_code == 201
        target = Target(
            base, port, created.json()["chain"]["id"], created.json()["root"]["id"],
            clip_path.read_bytes(),
        )  # fmt: skip
        cases = [
            *upload_cases(target, tmp_path / "bad"),
            *json_cases(target),
            *id_and_header_cases(target),
            *stream_cases(target),
        ]
        accepted_per_pass = sum(1 for c in cases if c.status == 201)
        rss: list[float] = []
        for _ in range(PASSES):
            for case in cases:
                check(case, client)
            rss.append(rss_mib(proc.pid))
        media = MediaStore(data_dir)
        assert list(media.tmp_dir.iterdir()) == []
        chains = client.get("/api/chains", params={"limit": 100}).json()
        assert chains["total"] == 1 + PASSES * accepted_per_pass
        stored = sorted(p.name for p in media.audio_dir.rglob("*.wav"))
        assert len(stored) == chains["total"], stored  # one canonical file per accepted upload
        assert client.get("/readyz").status_code == 200
        assert client.get(f"/api/chains/{target.chain_id}").status_code == 200
    print(
        f"hostile corpus: {len(cases)} cases × {PASSES} passes, "
        f"{accepted_per_pass} accepted per pass; server RSS after each pass (MiB): {rss}"
    )
    assert rss[-1] - rss[0] < 20_000 / 1024, f"the server's memory grew from pass to pass: {rss}"
    assert "Traceback" not in log.read_text(), log.read_text()[-5000:]


def test_a_slow_sender_and_a_stalled_one_do_not_hold_up_others(tmp_path: Path) -> None:
    data_dir, port = tmp_path / "data", free_port()
    base = f"http://127.0.0.1:{port}"
    clip = tmp_path / "clip.wav"
    write_wav(clip, render_music(1.0, 8000, 1, seed=5), 8000)
    body = multipart("slow.wav", clip.read_bytes())
    head = (
        f"POST /api/chains HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
        "Content-Type: multipart/form-data; boundary=b\r\n\r\n"
    ).encode()
    results: dict[str, int] = {}

    def slow_sender() -> None:  # 16 KB in 200 pieces over ~2.5 s, each gap under the timeout
        with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
            sock.sendall(head)
            step = len(body) // 200 + 1
            for i in range(0, len(body), step):
                sock.sendall(body[i : i + step])
                time.sleep(0.0125)
            results["slow"] = read_status(sock, 20)

    def stalled_sender() -> None:  # half the body, then nothing
        with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
            sock.sendall(head + body[: len(body) // 2])
            results["stalled"] = read_status(sock, 20)

    with (
        server_process(data_dir, port, SPARROW_ENGINE="mock", SPARROW_UPLOAD_IDLE_TIMEOUT_S="1"),
        httpx.Client(base_url=base, timeout=10) as client,
    ):
        threads = [threading.Thread(target=f) for f in (slow_sender, stalled_sender)]
        for t in threads:
            t.start()
        latencies = []
        while any(t.is_alive() for t in threads):
            started = time.perf_counter()
            assert client.get("/api/chains").status_code == 200
            latencies.append(time.perf_counter() - started)
            time.sleep(0.05)
        for t in threads:
            t.join(10)
        assert results == {"slow": 201, "stalled": 408}
        assert max(latencies) < 0.5, latencies
        assert list(MediaStore(data_dir).tmp_dir.iterdir()) == []
