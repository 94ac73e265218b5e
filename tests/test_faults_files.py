"""Files damaged behind the server's back: refused with a 503 until restored (SPEC §6, §7).

One real ``sparrow serve`` (mock engines, auth off: the local user is paid) on
127.0.0.1. Each test damages a file under the data dir while the server runs:
a node's WAV truncated, extended, overwritten with garbage of the same length,
its samples changed under an intact header (only its SHA-256 tells), the
same replaced by a new file with the old size and mtime (only its inode moved),
or deleted; and a ready stem's WAV truncated. While the fault lasts:

- the node still reads ``ready``, but its audio (GET, HEAD, a range, a
  revalidation with the old ETag) and its peaks are a 503
  ``storage_unavailable`` with ``Retry-After`` and no server path in the
  detail: never a 200/206 of the damaged bytes, never a 304, never a 404 for a
  file that is missing while its row says ready, never a 500;
- the server log has an error line naming the node;
- branching from it ends the new nodes ``error``/``storage_unavailable``, its
  stems end ``error``/``storage_unavailable`` (never ``ready`` made from
  zero-padded audio), and an export of a spine holding it is a 503 even where
  an export of that spine was made before the damage;
- every other node is served as before, and ``/readyz`` stays 200: one damaged
  file is one node's trouble, not the server's.

Once the original bytes are put back, with no restart, everything is served
again with the ETag it had before.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from crashes import mock_server
from faults import (
    assert_unavailable,
    branch,
    no_node_left_active,
    node_of,
    readiness,
    upload_sample,
    wait_nodes_ended,
    wait_stems_ended,
)
from probe import wav_frames

from sparrow.media import MediaStore

pytestmark = pytest.mark.slow

STEP_MS = "1"  # the mock engines at 20x real time: a 1 s branch in ~50 ms
WAIT_S = 20.0
CODE = "storage_unavailable"


@dataclass(frozen=True)
class Served:
    """The one server of this module: its client, data dir and log."""

    client: httpx.Client
    data_dir: Path
    log: Path

    @property
    def media(self) -> MediaStore:
        return MediaStore(self.data_dir)

    def log_size(self) -> int:
        return self.log.stat().st_size

    def log_since(self, offset: int) -> str:
        with self.log.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("faults-files")
    data_dir, log = root / "data", root / "server.log"
    with (
        mock_server(data_dir, log, STEP_MS) as (_proc, base),
        httpx.Client(base_url=base, timeout=30) as client,
    ):
        yield Served(client, data_dir, log)


# -- what the tests do to files -------------------------------------------------------


def _in_place(path: Path, write: Callable[[bytearray], bytes]) -> None:
    """Rewrite ``path`` in place (same inode) with ``write(its bytes)``; its mtime moves
    on, as any real write moves it (bumped by hand should the clock's tick hide it)."""
    before = path.stat().st_mtime_ns
    content = write(bytearray(path.read_bytes()))
    with path.open("r+b") as f:
        f.write(content)
        f.truncate(len(content))
    if path.stat().st_mtime_ns == before:
        os.utime(path, ns=(before, before + 1_000_000))


def truncate(path: Path, by: int = 4096) -> None:
    _in_place(path, lambda b: bytes(b[: len(b) - by]))


def extend(path: Path) -> None:
    _in_place(path, lambda b: bytes(b + b"\0" * 4096))


def garbage(path: Path) -> None:
    """The whole file overwritten with random bytes of the same length."""
    _in_place(path, lambda b: os.urandom(len(b)))


def change_samples(path: Path) -> None:
    """Samples changed under an intact header: same size, same frames; only the hash differs."""

    def flip(b: bytearray) -> bytes:
        middle = len(b) // 2
        b[middle : middle + 64] = bytes(x ^ 0x55 for x in b[middle : middle + 64])
        return bytes(b)

    _in_place(path, flip)


def replace_keeping_mtime(path: Path) -> None:
    """Changed samples in a new file renamed over it with the old mtime (a careless
    ``cp -p`` from a bad copy): same size and mtime; only the inode tells it moved."""
    before = path.stat()
    other = path.with_name(f".{path.name}.replacement")
    other.write_bytes(path.read_bytes())
    change_samples(other)
    os.utime(other, ns=(before.st_atime_ns, before.st_mtime_ns))
    other.replace(path)
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert after.st_ino != before.st_ino


def delete(path: Path) -> None:
    path.unlink()


DAMAGES: dict[str, Callable[[Path], None]] = {
    "truncated": truncate,
    "extended": extend,
    "overwritten with garbage": garbage,
    "samples changed": change_samples,
    "replaced, mtime kept": replace_keeping_mtime,
    "deleted": delete,
}


def restore(path: Path, original: bytes) -> None:
    """The original bytes back (a restore from backup), in place if the file is there."""
    if path.exists():
        _in_place(path, lambda _b: original)
    else:
        path.write_bytes(original)


# -- requests -------------------------------------------------------------------------


def branch_ready(client: httpx.Client, parent_id: str, *, count: int = 1) -> list[dict[str, Any]]:
    """Branch 1 s continuations and wait for them to be ready or error; returns them so."""
    ids = branch(client, parent_id, count=count)
    return wait_nodes_ended(client, ids, ends=("ready", "error"), timeout_s=WAIT_S)


def served_whole(response: httpx.Response, frames: int) -> bytes:
    """A 200 of a complete WAV of ``frames`` whose ETag is its SHA-256."""
    assert response.status_code == 200, (response.status_code, response.text)
    assert wav_frames(response.content) == frames
    assert response.headers["etag"] == f'"{hashlib.sha256(response.content).hexdigest()}"'
    return response.content


def assert_refused(client: httpx.Client, url: str, etag: str) -> None:
    """Every way of reading a file at ``url`` is a 503 while it is damaged."""
    assert_unavailable(client.get(url), CODE)
    assert_unavailable(client.get(url, headers={"If-None-Match": etag}), CODE)
    assert_unavailable(client.get(url, headers={"Range": "bytes=0-99"}), CODE)
    head = client.head(url)
    assert head.status_code == 503, head.status_code
    assert int(head.headers["retry-after"]) > 0
    assert head.content == b""


def assert_no_path(detail: str, data_dir: Path) -> None:
    assert str(data_dir) not in detail and "/audio/" not in detail, detail


# -- the tests ------------------------------------------------------------------------


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_node_file_is_refused_with_503_until_its_bytes_are_restored(
    served: Served, damage: str
) -> None:
    client = served.client
    _chain_id, root = upload_sample(client)
    _other_chain, other = upload_sample(client)
    audio_url, peaks_url = f"/api/nodes/{root['id']}/audio", f"/api/nodes/{root['id']}/peaks"
    original = served_whole(client.get(audio_url), root["frames"])
    etag = client.get(audio_url).headers["etag"]
    assert client.get(audio_url, headers={"If-None-Match": etag}).status_code == 304
    peaks = client.get(peaks_url)
    assert peaks.status_code == 200
    path = served.media.node_audio(root["chain_id"], root["id"])
    assert path.read_bytes() == original
    log_from = served.log_size()

    DAMAGES[damage](path)

    # Asked twice over: a file that failed is checked again, and fails again.
    for _ in range(2):
        assert_refused(client, audio_url, etag)
        assert_unavailable(client.get(peaks_url), CODE)
        revalidated = client.get(peaks_url, headers={"If-None-Match": peaks.headers["etag"]})
        assert_unavailable(revalidated, CODE)
    node = node_of(client, root["id"])
    assert node["status"] == "ready"
    served_whole(client.get(f"/api/nodes/{other['id']}/audio"), other["frames"])
    assert readiness(client)[0] == 200
    logged = [line for line in served.log_since(log_from).splitlines() if root["id"] in line]
    assert logged and all(line.startswith("ERROR") for line in logged), logged
    assert ("missing" if damage == "deleted" else "damaged") in logged[0]

    restore(path, original)

    assert served_whole(client.get(audio_url), root["frames"]) == original
    assert client.get(audio_url).headers["etag"] == etag
    assert client.get(audio_url, headers={"If-None-Match": etag}).status_code == 304
    ranged = client.get(audio_url, headers={"Range": "bytes=0-99"})
    assert ranged.status_code == 206 and ranged.content == original[:100]
    again = client.get(peaks_url)
    assert again.status_code == 200
    assert again.headers["etag"] == peaks.headers["etag"] and again.content == peaks.content


@pytest.mark.parametrize("damage", ["samples changed", "deleted"])
def test_branching_from_a_damaged_node_ends_the_new_nodes_storage_unavailable(
    served: Served, damage: str
) -> None:
    client = served.client
    chain_id, root = upload_sample(client)
    path = served.media.node_audio(chain_id, root["id"])
    original = path.read_bytes()
    served_whole(client.get(f"/api/nodes/{root['id']}/audio"), root["frames"])

    DAMAGES[damage](path)

    failed = branch_ready(client, root["id"], count=2)
    for node in failed:
        assert node["status"] == "error", node
        assert node["error"]["code"] == CODE, node
        assert_no_path(node["error"]["detail"], served.data_dir)
        assert client.get(f"/api/nodes/{node['id']}/audio").status_code == 409
        assert not served.media.node_audio(chain_id, node["id"]).exists()
    assert no_node_left_active(client, chain_id)
    assert readiness(client)[0] == 200

    restore(path, original)

    made = branch_ready(client, root["id"], count=2)
    assert [n["status"] for n in made] == ["ready", "ready"], made
    for node in made:
        served_whole(client.get(f"/api/nodes/{node['id']}/audio"), node["frames"])


def test_stems_of_a_damaged_node_end_in_error_and_a_damaged_stem_is_503(served: Served) -> None:
    client = served.client
    chain_id, root = upload_sample(client)
    path = served.media.node_audio(chain_id, root["id"])
    original = path.read_bytes()
    stems_url = f"/api/nodes/{root['id']}/stems"

    # Ten frames short: FFmpeg decodes it within the resampler's slack, and the stems
    # would be made of it padded with silence.
    truncate(path, by=10 * root["channels"] * 2)
    assert client.post(stems_url).status_code == 202
    stems = wait_stems_ended(client, root["id"], timeout_s=WAIT_S)
    assert stems["status"] == "error", stems
    assert stems["error"]["code"] == CODE, stems
    assert_no_path(stems["error"]["detail"], served.data_dir)
    assert stems["urls"] == {}
    assert client.get(f"{stems_url}/drums").status_code == 409
    assert not served.media.node_stems(chain_id, root["id"]).exists()
    assert readiness(client)[0] == 200

    restore(path, original)
    assert client.post(stems_url).status_code == 202
    stems = wait_stems_ended(client, root["id"], timeout_s=WAIT_S)
    assert stems["status"] == "ready", stems
    assert sorted(stems["urls"]) == ["bass", "drums", "other", "vocals"]
    bodies = {
        s: served_whole(client.get(f"{stems_url}/{s}"), stems["frames"]) for s in stems["urls"]
    }
    etags = {s: client.get(f"{stems_url}/{s}").headers["etag"] for s in stems["urls"]}
    drums = served.media.stem_file(chain_id, root["id"], "drums")
    assert drums.read_bytes() == bodies["drums"]

    truncate(drums)

    assert_refused(client, f"{stems_url}/drums", etags["drums"])
    for stem in ("bass", "other", "vocals"):
        assert served_whole(client.get(f"{stems_url}/{stem}"), stems["frames"]) == bodies[stem]
    assert client.get(stems_url).json()["status"] == "ready"
    assert readiness(client)[0] == 200

    restore(drums, bodies["drums"])

    again = client.get(f"{stems_url}/drums")
    assert served_whole(again, stems["frames"]) == bodies["drums"]
    assert again.headers["etag"] == etags["drums"]


@pytest.mark.parametrize("damage", ["overwritten with garbage", "samples changed", "deleted"])
def test_an_export_of_a_spine_with_a_damaged_node_is_503_until_restored(
    served: Served, damage: str
) -> None:
    client = served.client
    chain_id, root = upload_sample(client)
    (child,) = branch_ready(client, root["id"])
    assert child["status"] == "ready", child
    assert client.post(f"/api/nodes/{child['id']}/commit").status_code == 200
    export_url = f"/api/chains/{chain_id}/export"
    made = client.post(export_url, json={"format": "wav"})
    assert made.status_code == 200, made.text
    path = served.media.node_audio(chain_id, child["id"])
    original = path.read_bytes()

    DAMAGES[damage](path)

    # The export already made is not served either: its parts are checked first.
    for fmt in ("wav", "flac"):
        assert_unavailable(client.post(export_url, json={"format": fmt}), CODE)
    revalidated = client.post(
        export_url, json={"format": "wav"}, headers={"If-None-Match": made.headers["etag"]}
    )
    assert_unavailable(revalidated, CODE)
    assert readiness(client)[0] == 200
    served_whole(client.get(f"/api/nodes/{root['id']}/audio"), root["frames"])

    restore(path, original)

    again = client.post(export_url, json={"format": "wav"})
    assert again.status_code == 200, again.text
    assert again.headers["etag"] == made.headers["etag"]
    assert again.content == made.content
    assert client.post(export_url, json={"format": "flac"}).status_code == 200
