"""Deletes racing work in flight: answered for what they are, and nothing of a deleted chain stays.

The real ``sparrow serve`` (mock engines, auth off: the local user is paid) on
127.0.0.1, with three kinds of work caught by a delete:

- an export, made slow by an FFmpeg stand-in (``faults.FFmpegStandIn``,
  ``slow``: a second's sleep, then the real FFmpeg), when its chain is deleted
  as the request is sent, or 0, 0.4 or 0.7 s into FFmpeg's run, with one or two
  requests for the same export: each answers 404 (the chain is gone), never 500,
  and no folder of the chain is left under ``exports/``, ``stems/`` or
  ``audio/``; the chain kept exports as before. When instead the export's last
  node is uncommitted and discarded under it, the export is a 409 (its spine
  changed) and leaves nothing half-made;
- stems separating (the mock at a slowed step) and generation running, caught
  at 0, 50 and 90 % of their progress and while they write their files, by
  deletes from several clients at once:
  one delete of each chain is a 204 and the others 404, the jobs end, no folder
  of the chains is left, ``/readyz`` stays 200, and the worker goes on with
  the next job;
- a node's audio being downloaded, or asked for over and over, while the node
  is discarded: a download already under way ends whole, every answer is a
  complete file or a 404 (never a 503 or a 500: the file went with its row, it
  was not lost), and once the node is gone its audio, peaks and row are 404.
"""

from __future__ import annotations

import functools
import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import httpx
import pytest
from crashes import mock_server
from faults import (
    FFmpegStandIn,
    branch,
    no_node_left_active,
    node_of,
    readiness,
    upload_sample,
    wait_until,
)
from probe import wav_frames

from sparrow.media import MediaStore

pytestmark = pytest.mark.slow

T = TypeVar("T")

WAIT_S = 20.0
GONE_S = 5.0  # how long a deleted chain's folders may take to go


@dataclass(frozen=True)
class Served:
    client: httpx.Client
    base: str
    data_dir: Path
    log: Path

    @property
    def media(self) -> MediaStore:
        return MediaStore(self.data_dir)


@contextmanager
def serve(tmp_path: Path, step_ms: str, **env: str) -> Iterator[Served]:
    data_dir, log = tmp_path / "data", tmp_path / "server.log"
    with (
        mock_server(data_dir, log, step_ms, **env) as (_proc, base),
        httpx.Client(base_url=base, timeout=30) as client,
    ):
        yield Served(client, base, data_dir, log)
    # No request, however it was raced, was answered with an unexpected error.
    assert "Traceback" not in log.read_text(), log.read_text()[-4000:]


class Background(Generic[T]):
    """``fn()`` in a thread of its own; ``result()`` is what it returned (or raised)."""

    def __init__(self, fn: Callable[[], T]) -> None:
        self._fn = fn
        self._value: T | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._value = self._fn()
        except BaseException as exc:
            self._error = exc

    def result(self, timeout_s: float = WAIT_S) -> T:
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), f"{self._fn} did not end in {timeout_s:g} s"
        if self._error is not None:
            raise self._error
        assert self._value is not None
        return self._value


# -- requests -------------------------------------------------------------------------


def wait_ready_nodes(client: httpx.Client, node_ids: list[str]) -> list[dict[str, Any]]:
    """The nodes once all are ready; one in ``error`` fails at once."""

    def ready() -> list[dict[str, Any]] | None:
        nodes = [node_of(client, n) for n in node_ids]
        assert all(n["status"] != "error" for n in nodes), nodes
        return nodes if all(n["status"] == "ready" for n in nodes) else None

    return wait_until(ready, timeout_s=WAIT_S, what=f"nodes {node_ids} ready")


def chain_with_spine(client: httpx.Client) -> tuple[str, list[dict[str, Any]]]:
    """A chain whose spine is its root and one 1 s continuation."""
    chain_id, root = upload_sample(client)
    (child,) = wait_ready_nodes(client, branch(client, root["id"], duration_s=1, count=1))
    assert client.post(f"/api/nodes/{child['id']}/commit").status_code == 200
    return chain_id, [root, child]


def whole_wav(response: httpx.Response) -> None:
    """A 200 of a complete WAV whose ETag is its SHA-256."""
    assert response.status_code == 200, (response.status_code, response.text)
    assert wav_frames(response.content) > 0
    assert response.headers["etag"] == f'"{hashlib.sha256(response.content).hexdigest()}"'


def delete_at_once(base: str, chain_id: str, clients: int) -> list[int]:
    """``clients`` DELETEs of one chain, each on a connection of its own, let go together."""
    barrier = threading.Barrier(clients)

    def one() -> int:
        barrier.wait(5)
        return httpx.delete(f"{base}/api/chains/{chain_id}", timeout=30).status_code

    return sorted(t.result() for t in [Background(one) for _ in range(clients)])


def leftovers(media: MediaStore, chain_ids: list[str]) -> list[Path]:
    folders = (media.exports_dir, media.stems_dir, media.audio_dir)
    return [f / c for c in chain_ids for f in folders if (f / c).exists()]


def assert_nothing_left(media: MediaStore, chain_ids: list[str]) -> None:
    """No folder of the deleted chains stays under exports/, stems/ or audio/ (polled:
    work that ends after the delete answered removes what it made)."""
    wait_until(
        lambda: not leftovers(media, chain_ids),
        timeout_s=GONE_S,
        what=f"no folder left of deleted chains: {leftovers(media, chain_ids)}",
    )


def assert_gone(client: httpx.Client, chain_id: str, node_ids: list[str]) -> None:
    assert client.get(f"/api/chains/{chain_id}").status_code == 404
    for node_id in node_ids:
        for url in (f"/api/nodes/{node_id}", f"/api/nodes/{node_id}/audio"):
            response = client.get(url)
            assert response.status_code == 404, (url, response.status_code, response.text)


def worker_idle(client: httpx.Client) -> bool:
    gpu: dict[str, Any] = client.get("/api/gpu").json()
    return bool(gpu["queue_depth"] == 0 and gpu["running"] == [])


def an_export(response: httpx.Response) -> bytes:
    """A 200 attachment of a complete WAV (its ETag is the export's key)."""
    assert response.status_code == 200, (response.status_code, response.text)
    assert response.headers["content-disposition"].startswith("attachment")
    assert wav_frames(response.content) > 0
    return response.content


def post_export(url: str) -> Callable[[], httpx.Response]:
    """An export request to send from a thread, on a connection of its own."""
    return lambda: httpx.post(url, json={"format": "wav"}, timeout=30)


def folder_of(media: MediaStore, chain_id: str) -> Callable[[], bool]:
    return lambda: media.chain_exports(chain_id).exists()


# -- deletes racing exports -----------------------------------------------------------

# (seconds after FFmpeg's folder appears that the delete is sent, or None: as soon as
# the export request is; how many requests ask for the same export at once)
EXPORT_ROUNDS: list[tuple[float | None, int]] = [(None, 1), (0.0, 1), (0.4, 2), (0.7, 1)]


def test_deleting_a_chain_while_it_is_exported_answers_404_or_409_and_leaves_no_folder(
    tmp_path: Path,
) -> None:
    ffmpeg = FFmpegStandIn(tmp_path / "ffmpeg")
    with serve(tmp_path, "1", SPARROW_FFMPEG=str(ffmpeg.path)) as served:
        client, media = served.client, served.media
        # Made while FFmpeg is quick: uploads and branches use it too.
        chains = [chain_with_spine(client) for _ in range(len(EXPORT_ROUNDS) + 1)]
        kept_id = chains[-1][0]
        kept_export = an_export(
            client.post(f"/api/chains/{kept_id}/export", json={"format": "wav"})
        )
        ffmpeg.set("slow")
        answers: list[int] = []
        for (delay, requests), (chain_id, nodes) in zip(EXPORT_ROUNDS, chains, strict=False):
            url = f"{served.base}/api/chains/{chain_id}/export"
            exports = [Background(post_export(url)) for _ in range(requests)]
            if delay is not None:
                wait_until(
                    folder_of(media, chain_id),
                    timeout_s=5,
                    interval_s=0.01,
                    what="the export to start",
                )
                time.sleep(delay)
            assert client.delete(f"/api/chains/{chain_id}").status_code == 204
            for export in exports:
                answer = export.result()
                answers.append(answer.status_code)
                assert answer.status_code in (404, 409), (delay, answer.status_code, answer.text)
                expected = "not_found" if answer.status_code == 404 else "conflict"
                assert answer.json()["error"] == expected, answer.text
            assert_nothing_left(media, [chain_id])
            assert_gone(client, chain_id, [n["id"] for n in nodes])
            assert readiness(client)[0] == 200
        ffmpeg.set("ok")
        # The chain kept exports as before: the same file, and a new format made afresh.
        export_url = f"/api/chains/{kept_id}/export"
        assert an_export(client.post(export_url, json={"format": "wav"})) == kept_export
        assert client.post(export_url, json={"format": "flac"}).status_code == 200
        assert sorted(p.name for p in media.exports_dir.iterdir()) == [kept_id]
        assert len(answers) == sum(r for _d, r in EXPORT_ROUNDS)


def test_a_spine_changed_under_a_running_export_answers_409_and_keeps_the_chain(
    tmp_path: Path,
) -> None:
    """The export's last node uncommitted and discarded while FFmpeg is about to read it."""
    ffmpeg = FFmpegStandIn(tmp_path / "ffmpeg")
    with serve(tmp_path, "1", SPARROW_FFMPEG=str(ffmpeg.path)) as served:
        client, media = served.client, served.media
        chain_id, (root, child) = chain_with_spine(client)
        ffmpeg.set("slow")
        export = Background(post_export(f"{served.base}/api/chains/{chain_id}/export"))
        wait_until(folder_of(media, chain_id), timeout_s=5, interval_s=0.01, what="the export")
        assert client.post(f"/api/nodes/{child['id']}/uncommit").status_code == 200
        assert client.post(f"/api/nodes/{child['id']}/discard").status_code == 200
        answer = export.result()
        assert answer.status_code == 409, answer.text
        assert answer.json()["error"] == "conflict"
        # Nothing half-made stays beside the exports, and the new spine exports at once.
        assert [p.name for p in media.chain_exports(chain_id).iterdir()] == []
        ffmpeg.set("ok")
        made = an_export(client.post(f"/api/chains/{chain_id}/export", json={"format": "wav"}))
        assert wav_frames(made) == root["frames"]
        assert readiness(client)[0] == 200


# -- deletes racing stems and generation ----------------------------------------------

STEP_MS = "4"  # the mock: 4 ms per 20 ms of audio; the 8 s sample's stems take ~1.6 s
# Where each round's deletes land in the running job: at a progress, or (WRITING) once
# the job has begun to write its files.
WRITING = 1.0
AT_PROGRESS = (0.0, 0.5, 0.9, WRITING)
DELETERS = 3  # clients deleting the same chain at once


def progress_of(client: httpx.Client, node_ids: list[str]) -> float | None:
    """The running job's progress, if it is the one of ``node_ids``."""
    for job in client.get("/api/gpu").json()["running"]:
        if set(job["node_ids"]) & set(node_ids):
            progress: float = job["progress"]
            return progress
    return None


def reached(
    client: httpx.Client, node_ids: list[str], at: float, folder: Path, there: int
) -> Callable[[], bool]:
    """Whether the job of ``node_ids`` is running at ``at`` or further; for ``WRITING``,
    whether ``folder`` holds more than the ``there`` entries it held before the job."""

    def check() -> bool:
        if at == WRITING:
            return folder.exists() and len(list(folder.iterdir())) > there
        progress = progress_of(client, node_ids)
        return progress is not None and progress >= at

    return check


@pytest.mark.parametrize("at", AT_PROGRESS)
def test_concurrent_deletes_during_stems_and_generation_leave_no_folder_and_a_ready_server(
    tmp_path: Path, at: float
) -> None:
    # One job at a time (SPARROW_MAX_BATCH=1): each round finds its own job running.
    with serve(tmp_path, STEP_MS, SPARROW_MAX_BATCH="1") as served:
        client, media = served.client, served.media
        stems_chain, stems_root = upload_sample(client)
        gen_chain, gen_root = upload_sample(client)
        next_chain, next_root = upload_sample(client)
        assert client.post(f"/api/nodes/{stems_root['id']}/stems").status_code == 202
        generated = branch(client, gen_root["id"], duration_s=6, count=2)
        queued_after = branch(client, next_root["id"], duration_s=1, count=1)

        # Stems write into a folder of their own; generation beside its parent's file.
        rounds = [
            (stems_chain, [stems_root["id"]], media.node_stems(stems_chain, stems_root["id"]), 0),
            (gen_chain, generated, media.chain_dir(gen_chain), 1),
        ]
        for chain_id, watched, folder, there in rounds:
            wait_until(
                reached(client, watched, at, folder, there),
                timeout_s=WAIT_S,
                interval_s=0.005,
                what=f"the job of {watched} at {at}",
            )
            statuses = delete_at_once(served.base, chain_id, DELETERS)
            assert statuses == [204] + [404] * (DELETERS - 1), statuses
            assert readiness(client)[0] == 200

        assert_nothing_left(media, [stems_chain, gen_chain])
        assert_gone(client, stems_chain, [stems_root["id"]])
        assert_gone(client, gen_chain, [gen_root["id"], *generated])
        assert client.get(f"/api/nodes/{stems_root['id']}/stems").status_code == 404
        # The worker went on with the job queued behind them.
        (after,) = wait_ready_nodes(client, queued_after)
        whole_wav(client.get(f"/api/nodes/{after['id']}/audio"))
        assert no_node_left_active(client, next_chain)
        wait_until(lambda: worker_idle(client), timeout_s=WAIT_S, what="the worker idle")
        assert readiness(client)[0] == 200
        assert sorted(p.name for p in media.audio_dir.iterdir()) == [next_chain]
        assert list(media.stems_dir.iterdir()) == []


# -- discards racing downloads --------------------------------------------------------


def test_a_download_under_way_ends_whole_when_its_node_is_discarded(tmp_path: Path) -> None:
    with serve(tmp_path, "0") as served:
        client, media = served.client, served.media
        chain_id, root = upload_sample(client)
        (node,) = wait_ready_nodes(client, branch(client, root["id"], duration_s=30, count=1))
        path = media.node_audio(chain_id, node["id"])
        size = path.stat().st_size
        assert size > 1 << 20  # many reads, so the discard lands in the middle of them
        url = f"/api/nodes/{node['id']}/audio"
        with client.stream("GET", url) as download:
            assert download.status_code == 200
            chunks = download.iter_raw(65536)
            received = next(chunks)
            assert len(received) < size
            discarded = client.post(f"/api/nodes/{node['id']}/discard")
            assert discarded.status_code == 200
            assert discarded.json()["deleted"] == [node["id"]]
            assert not path.exists()
            received += b"".join(chunks)
            etag = download.headers["etag"]
        assert len(received) == size
        assert wav_frames(received) == node["frames"]
        assert etag == f'"{hashlib.sha256(received).hexdigest()}"'
        for method, suffix in (("GET", "/audio"), ("HEAD", "/audio"), ("GET", "/peaks")):
            answer = client.request(method, f"/api/nodes/{node['id']}{suffix}")
            assert answer.status_code == 404, (method, suffix, answer.status_code)
        assert client.get(f"/api/nodes/{node['id']}").status_code == 404
        assert readiness(client)[0] == 200


READERS = 4
SIBLINGS = 6
# What each kind of request may answer while its node is being discarded.
ALLOWED = {"audio": {200, 404}, "range": {206, 404}, "HEAD": {200, 404}, "peaks": {200, 404}}


def ask_until(base: str, node_id: str, stop: threading.Event) -> list[tuple[str, int, str]]:
    """A node's audio, a range of it, HEAD and peaks, round and round until ``stop``;
    every answer as (what, status, a word on it); status 0: the answer broke off."""
    url = f"/api/nodes/{node_id}"
    requests: dict[str, tuple[str, str, dict[str, str]]] = {
        "audio": ("GET", f"{url}/audio", {}),
        "range": ("GET", f"{url}/audio", {"Range": "bytes=0-9"}),
        "HEAD": ("HEAD", f"{url}/audio", {}),
        "peaks": ("GET", f"{url}/peaks", {}),
    }
    seen: list[tuple[str, int, str]] = []
    with httpx.Client(base_url=base, timeout=30) as own:
        for _ in range(10_000):  # bounded; stopped long before
            if stop.is_set():
                break
            for what, (method, path, headers) in requests.items():
                try:
                    answer = own.request(method, path, headers=headers)
                except httpx.TransportError as exc:
                    seen.append((what, 0, f"{type(exc).__name__}: {exc}"))
                    continue
                if what == "audio" and answer.status_code == 200:
                    whole_wav(answer)
                seen.append((what, answer.status_code, answer.text[:200]))
    return seen


def test_a_node_discarded_while_asked_for_is_a_whole_file_or_a_404_never_503(
    tmp_path: Path,
) -> None:
    with serve(tmp_path, "0") as served:
        client, media = served.client, served.media
        chain_id, root = upload_sample(client)
        siblings = wait_ready_nodes(
            client, branch(client, root["id"], duration_s=2, count=SIBLINGS)
        )
        seen: list[tuple[str, int, str]] = []
        for node in siblings:
            stop = threading.Event()
            readers = [
                Background(functools.partial(ask_until, served.base, node["id"], stop))
                for _ in range(READERS)
            ]
            time.sleep(0.1)
            discarded = client.post(f"/api/nodes/{node['id']}/discard")
            assert discarded.status_code == 200, discarded.text
            time.sleep(0.1)
            stop.set()
            seen += [answer for r in readers for answer in r.result()]
            assert client.get(f"/api/nodes/{node['id']}/audio").status_code == 404
            assert not media.node_audio(chain_id, node["id"]).exists()
        wrong = [a for a in seen if a[1] not in ALLOWED[a[0]]]
        assert wrong == [], (len(wrong), len(seen), wrong[:5])
        statuses = {status for _what, status, _word in seen}
        assert {200, 404} <= statuses, "the discard should have landed among the requests"
        nodes = client.get(f"/api/chains/{chain_id}").json()["nodes"]
        assert [n["id"] for n in nodes] == [root["id"]]
        assert readiness(client)[0] == 200
