"""kill -9 in a loop, during generation, stem separation and export (SPEC §5, §6).

One data dir, 30 kills: 10 during generation, 10 during stem separation and 10
during export, in turn. Each round starts the real ``sparrow serve`` (mock engines
at ``SPARROW_MOCK_STEP_MS=3``: a 2 s branch or separation is in flight for a
third of a second), checks what the previous kill left, does acknowledged work (an
upload, a commit, branches, a stems request: the ids of every 2xx answer are
recorded), starts the round's long work and SIGKILLs the server at the round's
moment. The moments differ from round to round (``GENERATION_KILLS``,
``STEMS_KILLS``, ``EXPORT_KILLS``): just queued, the engine running, a file being
written, a file published but not yet recorded. Where each kill landed is read
back from what it left; each phase set in ``MUST_HIT`` must have been hit.

After each kill, with the process dead, ``PRAGMA integrity_check`` is ok, and the
database's state is kept; orphans are planted (files of a node, of stems and of
an export that the database does not know, temporary names). After the restart,
once the job queue is empty:

- every chain, node, commit and stems request a client had a 2xx for is still there;
- nothing is queued, generating or separating: what was running at the kill ended
  ``error``/``interrupted``, what was queued behind it ran to ``ready``, and what was
  ready is ready with the same hash;
- the files are exactly what the database accounts for: one complete WAV of
  ``frames`` per ready node, four complete stems per ready stems row (the node's
  duration at 44.1 kHz), exports only of known chains and of exports asked for, each
  complete; no temporary file anywhere, ``tmp/`` empty, the planted orphans gone;
- every node and stem that became ready is served whole (exact frames, ETag = hash);
  while the work ran, what was not ready was a 409;
- the export a kill interrupted is made again, complete: ffprobe counts exactly the
  frames the spine gives (MP3: within one MPEG frame).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from crashes import check_audio, integrity_ok, kill_9, mock_server
from helpers import SAMPLE
from probe import ffprobe, wav_frames

from sparrow.audio import ffmpeg_exe, render_music, write_wav
from sparrow.engines.base import STEM_NAMES
from sparrow.media import MediaStore

STEP_MS = "3"  # per 20 ms of audio, for generation and stems alike
CLIP_S = 2.0  # every upload: 44.1 kHz stereo
A_S, B_S = 2.0, 1.0  # the branch a generation round kills, and one queued behind it
STEMS_RATE = 44_100  # the mock's, as Demucs'
EXPORT_RATE = 44_100  # the clip's: the highest of the spine, and an MPEG-1 rate
MP3_FRAME = 1152
POLL_S = 0.0005
DEADLINE_S = 15.0


@dataclass(frozen=True)
class Kill:
    """When a round's kill lands: once ``when`` holds, ``after_s`` later."""

    when: str
    after_s: float = 0.0
    progress: float = 0.0  # for when == "progress"


# Job A: two 2 s siblings, written one after the other; then job B, queued behind it.
GENERATION_KILLS = (
    Kill("queued"),
    Kill("progress", progress=0.2),
    Kill("progress", progress=0.7),
    Kill("writing"),
    Kill("writing", 0.001),
    Kill("writing", 0.003),
    Kill("published"),
    Kill("next-job"),
    Kill("next-writing"),
    Kill("next-published", 0.001),
)
# The first node of the job: its folder appears, then drums, bass, other, vocals.
STEMS_KILLS = (
    Kill("queued"),
    Kill("progress", progress=0.3),
    Kill("progress", progress=0.8),
    Kill("writing"),
    Kill("writing", 0.002),
    Kill("writing", 0.005),
    Kill("writing", 0.01),
    Kill("published"),
    Kill("published-all"),
    Kill("ready"),
)
# FFmpeg's output appears (a hidden name), then the export under its own name.
EXPORT_KILLS = (
    Kill("sent"),
    Kill("sent", 0.01),
    Kill("writing"),
    Kill("writing", 0.003),
    Kill("writing", 0.008),
    Kill("writing", 0.015),
    Kill("writing", 0.03),
    Kill("writing", 0.06),
    Kill("published"),
    Kill("published", 0.002),
)
EXPORTS = (("wav", 20.0), ("flac", 0.0), ("mp3", 35.0))  # format, crossfade_ms, in turn
KINDS: dict[str, tuple[Kill, ...]] = {
    "generation": GENERATION_KILLS,
    "stems": STEMS_KILLS,
    "export": EXPORT_KILLS,
}
# For each kind, sets of phases (as ``landed`` names them) of which one must be hit.
MUST_HIT = {
    "generation": [{"generating"}, {"writing", "published"}],
    "stems": [{"separating"}, {"writing"}],
    "export": [{"writing"}],
}


@dataclass(frozen=True)
class Row:
    """A node or a stems row as the database holds it."""

    chain: str
    status: str
    job: str | None  # its job's status; None when it has no job row
    error: str | None  # the error's code
    rate: int | None
    frames: int | None
    digest: str | None  # the audio's SHA-256, or the stems' {name: SHA-256}
    parent: str | None


@dataclass(frozen=True)
class DbState:
    chains: set[str]
    nodes: dict[str, Row]
    stems: dict[str, Row]
    jobs: int


def read_db(data_dir: Path) -> DbState:
    uri = f"file:{data_dir / 'sparrow.db'}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:

        def rows(sql: str) -> dict[str, Row]:
            out = {}
            for key, chain, status, job, error, rate, frames, digest, parent in db.execute(sql):
                code = json.loads(error)["code"] if error else None
                out[key] = Row(chain, status, job, code, rate, frames, digest, parent)
            return out

        nodes = rows(
            "SELECT n.id, n.chain_id, n.status, j.status, n.error, n.sample_rate, n.frames, "
            "n.audio_sha256, n.parent_id FROM nodes AS n LEFT JOIN jobs AS j ON j.id = n.job_id "
            "ORDER BY n.rowid"
        )
        stems = rows(
            "SELECT s.node_id, s.chain_id, s.status, j.status, s.error, s.sample_rate, s.frames, "
            "s.files, NULL FROM stems AS s LEFT JOIN jobs AS j ON j.id = s.job_id ORDER BY s.rowid"
        )
        chains = {r[0] for r in db.execute("SELECT id FROM chains")}
        (jobs,) = db.execute("SELECT count(*) FROM jobs").fetchone()
    return DbState(chains, nodes, stems, jobs)


def after_restart(row: Row) -> str:
    """The status a row the kill left must reach once recovery and the queue are done."""
    if row.status in ("generating", "separating"):
        return "error"
    if row.status == "queued":
        return "ready" if row.job == "queued" else "error"  # its job ran on, or was cut
    return row.status


@dataclass
class Ledger:
    """What clients were told (every 2xx answer), and what is already checked."""

    main: str = ""  # the chain the rounds work on
    tail: str = ""  # the last node of its spine
    chains: set[str] = field(default_factory=set)
    nodes: dict[str, str] = field(default_factory=dict)  # node id → chain id
    committed: set[str] = field(default_factory=set)
    stems: set[str] = field(default_factory=set)  # nodes whose stems were asked for
    exports: dict[str, tuple[str, int]] = field(default_factory=dict)  # key → format, frames
    whole: dict[Path, tuple[int, int, int]] = field(default_factory=dict)  # size, mtime, frames
    served: set[str] = field(default_factory=set)  # node ids, "node/stem"
    landed: dict[str, list[str]] = field(default_factory=dict)  # kind → phase of each kill


# -- after a restart ---------------------------------------------------------------------


def drain(data_dir: Path) -> None:
    """Wait until the worker has no job left (a job's row goes once its work is recorded)."""
    deadline = time.monotonic() + DEADLINE_S
    while read_db(data_dir).jobs:
        assert time.monotonic() < deadline, "the queue did not drain"
        time.sleep(0.02)


def check_recovered(
    client: httpx.Client,
    data_dir: Path,
    ledger: Ledger,
    before: DbState,
    orphans: list[Path],
    export: tuple[str, float] | None,
) -> None:
    """Everything the module's docstring lists, for the kill that left ``before``."""
    drain(data_dir)
    if export is not None:
        make_export(client, data_dir, ledger, *export)
    now = read_db(data_dir)
    assert now.jobs == 0
    assert {n for n, r in now.nodes.items() if r.status in ("queued", "generating")} == set()
    assert {n for n, r in now.stems.items() if r.status in ("queued", "separating")} == set()
    assert before.chains <= now.chains
    for rows_before, rows_now in ((before.nodes, now.nodes), (before.stems, now.stems)):
        for key, was in rows_before.items():
            row = rows_now[key]
            assert row.status == after_restart(was), (key, was, row)
            if was.status != row.status and row.status == "error":
                assert row.error == "interrupted", (key, was, row)
            if was.status == "ready":
                assert (row.digest, row.frames) == (was.digest, was.frames)

    # Every 2xx a client had is still true.
    listed = client.get("/api/chains", params={"limit": 200}).json()
    assert ledger.chains <= {c["id"] for c in listed["items"]}
    detail = client.get(f"/api/chains/{ledger.main}").json()
    by_id = {n["id"]: n for n in detail["nodes"]}
    assert {n for n, c in ledger.nodes.items() if c == ledger.main} <= by_id.keys()
    assert ledger.nodes.keys() <= now.nodes.keys()
    assert all(by_id[n]["committed"] for n in ledger.committed)
    spine_stems = client.get(f"/api/chains/{ledger.main}/stems").json()["nodes"]
    assert ledger.stems <= {s["node_id"] for s in spine_stems if s["status"] is not None}

    check_files(MediaStore(data_dir), now, ledger)
    assert [p for p in orphans if p.exists()] == []
    check_served(client, now, ledger)
    commit_a_child(client, now, ledger)


def whole_wav(path: Path, ledger: Ledger) -> int:
    """A WAV's frames, once its header is found to match the whole file (cached by stat)."""
    stat = path.stat()
    known = ledger.whole.get(path)
    if known is not None and known[:2] == (stat.st_size, stat.st_mtime_ns):
        return known[2]
    frames = wav_frames(path.read_bytes())
    ledger.whole[path] = (stat.st_size, stat.st_mtime_ns, frames)
    return frames


def check_files(media: MediaStore, db: DbState, ledger: Ledger) -> None:
    """The files on disk are exactly those the database accounts for, each complete."""
    assert sorted(media.tmp_dir.iterdir()) == []
    ready = {n: r for n, r in db.nodes.items() if r.status == "ready"}
    assert {d.name for d in media.audio_dir.iterdir()} == db.chains  # each has a ready root
    on_disk = {(d.name, f.name) for d in media.audio_dir.iterdir() for f in d.iterdir()}
    assert on_disk == {(r.chain, f"{n}.wav") for n, r in ready.items()}
    for node_id, row in ready.items():
        assert whole_wav(media.node_audio(row.chain, node_id), ledger) == row.frames

    stems = {n: r for n, r in db.stems.items() if r.status == "ready"}
    assert {d.name for d in media.stems_dir.iterdir()} <= db.chains
    folders = {(c.name, d.name) for c in media.stems_dir.iterdir() for d in c.iterdir()}
    assert folders == {(r.chain, n) for n, r in stems.items()}
    for node_id, row in stems.items():
        node = db.nodes[node_id]
        assert node.frames and node.rate
        assert row.frames == round(node.frames * STEMS_RATE / node.rate)
        folder = media.node_stems(row.chain, node_id)
        assert sorted(f.name for f in folder.iterdir()) == sorted(f"{s}.wav" for s in STEM_NAMES)
        for stem in STEM_NAMES:
            assert whole_wav(folder / f"{stem}.wav", ledger) == row.frames

    assert {d.name for d in media.exports_dir.iterdir()} <= db.chains
    for folder in media.exports_dir.iterdir():
        for file in folder.iterdir():
            assert file.stem in ledger.exports, f"an export nobody asked for, or a temp: {file}"
            fmt, frames = ledger.exports[file.stem]
            assert file.suffix == f".{fmt}"
            check_export(file, ledger, fmt, frames)


def check_export(path: Path, ledger: Ledger, fmt: str, frames: int) -> None:
    stat = path.stat()
    if ledger.whole.get(path, (0, 0, 0))[:2] == (stat.st_size, stat.st_mtime_ns):
        return
    probed = ffprobe(path)
    assert (probed["format_name"], probed["sample_rate"]) == (fmt, str(EXPORT_RATE)), probed
    tolerance = MP3_FRAME if fmt == "mp3" else 0
    assert abs(probed["decoded_samples"] - frames) <= tolerance, (probed, frames)
    ledger.whole[path] = (stat.st_size, stat.st_mtime_ns, frames)


def check_stem(client: httpx.Client, node_id: str, stem: str, frames: int, sha256: str) -> None:
    response = client.get(f"/api/nodes/{node_id}/stems/{stem}")
    assert response.status_code == 200, response.text
    assert wav_frames(response.content) == frames
    assert response.headers["etag"] == f'"{sha256}"'


def check_served(client: httpx.Client, db: DbState, ledger: Ledger) -> None:
    """Every ready node and stem not downloaded yet is served whole."""
    for node_id, row in db.nodes.items():
        if row.status == "ready" and node_id not in ledger.served:
            check_audio(client, {"id": node_id, "status": "ready", "frames": row.frames})
            ledger.served.add(node_id)
    for node_id, row in db.stems.items():
        if row.status != "ready" or node_id in ledger.served:
            continue
        assert row.frames
        files = json.loads(row.digest or "{}")
        for stem in STEM_NAMES:
            check_stem(client, node_id, stem, row.frames, files[stem])
        ledger.served.add(node_id)


def commit_a_child(client: httpx.Client, db: DbState, ledger: Ledger) -> None:
    """Make the spine one node longer, with a node the last generation round made."""
    children = [n for n, r in db.nodes.items() if r.parent == ledger.tail and r.status == "ready"]
    if not children:
        return
    response = client.post(f"/api/nodes/{children[0]}/commit")
    assert response.status_code == 200, response.text
    assert response.json()["spine"]["nodes"][-1]["node"]["id"] == children[0]
    ledger.committed.add(children[0])
    ledger.tail = children[0]


def export_frames(client: httpx.Client, ledger: Ledger, crossfade_ms: float) -> int:
    """The export's length from the spine (docs/stems-export-auth.md, Export)."""
    spine = [e["node"] for e in client.get(f"/api/chains/{ledger.main}/spine").json()["nodes"]]
    assert max(n["sample_rate"] for n in spine) == EXPORT_RATE
    lengths: list[int] = [round(n["frames"] * EXPORT_RATE / n["sample_rate"]) for n in spine]
    fade = round(crossfade_ms * EXPORT_RATE / 1000) if len(lengths) > 1 else 0
    return sum(lengths) - (len(lengths) - 1) * fade


def make_export(
    client: httpx.Client, data_dir: Path, ledger: Ledger, fmt: str, crossfade_ms: float
) -> None:
    """Ask again for the export a kill interrupted: 200, complete, and the file kept."""
    frames = export_frames(client, ledger, crossfade_ms)
    response = client.post(
        f"/api/chains/{ledger.main}/export", json={"format": fmt, "crossfade_ms": crossfade_ms}
    )
    assert response.status_code == 200, response.text
    key = response.headers["etag"].strip('"')
    ledger.exports[key] = (fmt, frames)
    path = MediaStore(data_dir).chain_exports(ledger.main) / f"{key}.{fmt}"
    assert path.read_bytes() == response.content
    check_export(path, ledger, fmt, frames)


# -- the rounds ----------------------------------------------------------------------------

Landed = Callable[[DbState], str]  # where a kill landed, from what it left


def kill_when(
    proc: subprocess.Popen[bytes],
    ready: Callable[[], bool],
    after_s: float,
    *,
    poll_s: float = POLL_S,
) -> None:
    """SIGKILL the server ``after_s`` after ``ready()`` first holds."""
    deadline = time.monotonic() + DEADLINE_S
    while not ready():
        assert time.monotonic() < deadline, "the moment for the kill never came"
        time.sleep(poll_s)
    if after_s:
        time.sleep(after_s)
    kill_9(proc)


def hidden(folder: Path, prefix: str = ".") -> bool:
    """Whether ``folder`` holds a temporary name (``.<name>.<random>.tmp``) so starting."""
    with contextlib.suppress(FileNotFoundError):
        return any(p.name.startswith(prefix) for p in folder.iterdir())
    return False


def upload(client: httpx.Client, ledger: Ledger, clip: bytes) -> tuple[str, str]:
    created = client.post("/api/chains", files={"file": ("clip.wav", clip)})
    assert created.status_code == 201, created.text
    chain_id: str = created.json()["chain"]["id"]
    root_id: str = created.json()["root"]["id"]
    ledger.chains.add(chain_id)
    ledger.nodes[root_id] = chain_id
    return chain_id, root_id


def branch(
    client: httpx.Client, ledger: Ledger, count: int, seconds: float, seed: int
) -> list[str]:
    response = client.post(
        f"/api/nodes/{ledger.tail}/branch",
        json={"count": count, "duration_s": seconds, "seed": seed},
    )
    assert response.status_code == 202, response.text
    ids = [n["id"] for n in response.json()["nodes"]]
    ledger.nodes.update(dict.fromkeys(ids, ledger.main))
    return ids


def kill_generating(
    proc: subprocess.Popen[bytes],
    client: httpx.Client,
    media: MediaStore,
    ledger: Ledger,
    kill: Kill,
    seed: int,
) -> Landed:
    a = branch(client, ledger, 2, A_S, seed)
    b = branch(client, ledger, 1, B_S, seed + 2)
    folder = media.chain_dir(ledger.main)

    def files(ids: list[str]) -> bool:
        return any(hidden(folder, f".{n}.") or (folder / f"{n}.wav").exists() for n in ids)

    def progressed() -> bool:
        for node_id in a:  # meanwhile: a 409 until ready, then the whole file
            check_audio(client, client.get(f"/api/nodes/{node_id}").json())
        running = client.get("/api/gpu").json()["running"]
        ahead = bool(running) and running[0]["node_ids"] == sorted(a)
        return bool(ahead and running[0]["progress"] > kill.progress) or files(a)

    def b_started() -> bool:
        status: str = client.get(f"/api/nodes/{b[0]}").json()["status"]
        return status != "queued"

    triggers: dict[str, Callable[[], bool]] = {
        "queued": lambda: True,
        "progress": progressed,
        "writing": lambda: files(a),
        "published": (folder / f"{a[0]}.wav").exists,
        "next-job": b_started,
        "next-writing": lambda: files(b),
        "next-published": (folder / f"{b[0]}.wav").exists,
    }
    slow = kill.when in ("progress", "next-job")  # those ask the server
    kill_when(proc, triggers[kill.when], kill.after_s, poll_s=0.01 if slow else POLL_S)

    def landed(db: DbState) -> str:
        for ids in (a, b):
            statuses = {db.nodes[n].status for n in ids}
            if statuses == {"queued"}:
                return "queued"
            if "generating" in statuses:
                if any(hidden(folder, f".{n}.") for n in ids):
                    return "writing"
                if any(
                    (folder / f"{n}.wav").exists() for n in ids if db.nodes[n].status != "ready"
                ):
                    return "published"  # complete, under its name, not recorded
                return "generating"
        return "done"

    return landed


def kill_separating(
    proc: subprocess.Popen[bytes],
    client: httpx.Client,
    media: MediaStore,
    ledger: Ledger,
    kill: Kill,
    spine: bool,
) -> Landed:
    if spine:  # every spine node whose stems are not ready or on their way
        response = client.post(f"/api/chains/{ledger.main}/stems")
        assert response.status_code == 202, response.text
        queued = [s["node_id"] for s in response.json()["nodes"] if s["status"] == "queued"]
    else:
        response = client.post(f"/api/nodes/{ledger.tail}/stems")
        assert response.status_code == 202, response.text
        queued = [ledger.tail]
    ledger.stems.update(queued)
    watched = queued[0]
    folder = media.node_stems(ledger.main, watched)

    def stems() -> dict[str, Any]:
        """The stems as read just before their first stem's route: a 409 until they are
        ready, then the whole file."""
        view: dict[str, Any] = client.get(f"/api/nodes/{watched}/stems").json()
        response = client.get(f"/api/nodes/{watched}/stems/{STEM_NAMES[0]}")
        if view["status"] != "ready" and response.status_code != 200:
            assert response.status_code == 409, response.text
            return view
        assert response.status_code == 200, response.text
        view = client.get(f"/api/nodes/{watched}/stems").json()  # it became ready meanwhile
        assert view["status"] == "ready"
        assert wav_frames(response.content) == view["frames"]
        return view

    def progressed() -> bool:
        view = stems()
        active = view["status"] in ("queued", "separating")
        return not active or (view["progress"] or 0) >= kill.progress

    triggers: dict[str, Callable[[], bool]] = {
        "queued": lambda: True,
        "progress": progressed,
        "writing": folder.exists,
        "published": (folder / f"{STEM_NAMES[0]}.wav").exists,
        "published-all": lambda: all((folder / f"{s}.wav").exists() for s in STEM_NAMES),
        "ready": lambda: stems()["status"] == "ready",
    }
    slow = kill.when in ("progress", "ready")  # those ask the server
    kill_when(proc, triggers[kill.when], kill.after_s, poll_s=0.01 if slow else POLL_S)

    def landed(db: DbState) -> str:
        status = db.stems[watched].status
        if status == "separating" and folder.exists():
            return "writing"  # its folder is made just before the stems are written
        return status

    return landed


def kill_exporting(
    proc: subprocess.Popen[bytes],
    base: str,
    media: MediaStore,
    ledger: Ledger,
    kill: Kill,
    fmt: str,
    crossfade_ms: float,
) -> Landed:
    folder = media.chain_exports(ledger.main)
    before = {f.name for f in folder.iterdir()} if folder.exists() else set()
    answers: list[httpx.Response | Exception] = []

    def export() -> None:
        try:
            answers.append(
                httpx.post(
                    f"{base}/api/chains/{ledger.main}/export",
                    json={"format": fmt, "crossfade_ms": crossfade_ms},
                    timeout=DEADLINE_S,
                )
            )
        except httpx.TransportError as exc:
            answers.append(exc)

    def published() -> bool:
        with contextlib.suppress(FileNotFoundError):
            return any(
                not f.name.startswith(".") and f.name not in before for f in folder.iterdir()
            )
        return False

    triggers: dict[str, Callable[[], bool]] = {
        "sent": lambda: True,
        "writing": lambda: hidden(folder) or published(),
        "published": published,
    }
    sender = threading.Thread(target=export)
    sender.start()
    try:
        kill_when(proc, triggers[kill.when], kill.after_s)
    finally:
        sender.join(DEADLINE_S)
    assert not sender.is_alive() and len(answers) == 1
    # Read now: the FFmpeg outlives the server and may still be writing.
    phase = "published" if published() else "writing" if hidden(folder) else "before FFmpeg"
    return lambda db: phase


def plant_orphans(media: MediaStore, ledger: Ledger, round_: int) -> list[Path]:
    """Files a crash could leave that the database does not account for."""
    unknown = f"{round_ + 1:032x}"  # never an id the database issues (those are random)
    paths = [
        media.node_audio(ledger.main, unknown),
        media.chain_dir(ledger.main) / f".{ledger.tail}.wav.{unknown[:16]}.tmp",
        media.stem_file(ledger.main, unknown, STEM_NAMES[0]),
        media.chain_exports(ledger.main) / f".{unknown}.wav.{unknown[:16]}.tmp" / "x.wav",
        media.chain_exports(unknown) / f"{unknown}.wav",
        media.node_audio(unknown, unknown),
        media.tmp_dir / f"upload-{unknown}",
    ]
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"RIFF\x24\x00\x00\x00WAVE")
    return [*paths, paths[3].parent]


@pytest.mark.slow
def test_kill_9_in_a_loop_loses_nothing_and_leaves_nothing(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    log = tmp_path / "server.log"
    media = MediaStore(data_dir)
    clip_path = tmp_path / "clip.wav"
    write_wav(clip_path, render_music(CLIP_S, 44_100, 2, seed=5), 44_100)
    clip = clip_path.read_bytes()
    ledger = Ledger(landed={kind: [] for kind in KINDS})
    # generation, stems, export, generation, …: each kind's kills in their order
    rounds = [
        (kind, kills[i]) for i in range(len(GENERATION_KILLS)) for kind, kills in KINDS.items()
    ]
    before: DbState | None = None
    orphans: list[Path] = []
    export: tuple[str, float] | None = None  # the last export a kill interrupted
    round_, kind = 0, ""
    try:
        for round_, (kind, kill) in enumerate(rounds):
            with (
                # One job at a time: the kill points name the queue's order (the next job,
                # its writing); jobs side by side are killed in test_crash_generation.
                mock_server(data_dir, log, STEP_MS, SPARROW_MAX_BATCH="1") as (proc, base),
                httpx.Client(base_url=base, timeout=DEADLINE_S) as client,
            ):
                if before is None:
                    ledger.main, ledger.tail = upload(client, ledger, clip)
                else:
                    check_recovered(client, data_dir, ledger, before, orphans, export)
                upload(client, ledger, clip)
                count = len(ledger.landed[kind])
                export = None
                if kind == "generation":
                    landed = kill_generating(proc, client, media, ledger, kill, seed=round_)
                elif kind == "stems":
                    landed = kill_separating(proc, client, media, ledger, kill, count % 2 == 0)
                else:
                    export = EXPORTS[count % len(EXPORTS)]
                    landed = kill_exporting(proc, base, media, ledger, kill, *export)
            integrity_ok(data_dir)
            before = read_db(data_dir)
            ledger.landed[kind].append(landed(before))
            orphans = plant_orphans(media, ledger, round_)
        round_, kind = len(rounds), "the last restart"
        assert before is not None
        with (
            mock_server(data_dir, log, STEP_MS, SPARROW_MAX_BATCH="1") as (_proc, base),
            httpx.Client(base_url=base, timeout=DEADLINE_S) as client,
        ):
            check_recovered(client, data_dir, ledger, before, orphans, export)
    except BaseException:
        print(f"round {round_} ({kind}); the kills landed {ledger.landed}; the servers' log:")
        print(log.read_text()[-3000:])
        raise
    integrity_ok(data_dir)
    print("where the kills landed:", ledger.landed)  # shown with -s
    for kind, wanted in MUST_HIT.items():
        assert len(ledger.landed[kind]) == len(KINDS[kind])
        for phases in wanted:
            assert phases & set(ledger.landed[kind]), (kind, phases, ledger.landed[kind])


@pytest.mark.slow
def test_an_export_ffmpeg_outliving_the_server_leaves_no_file(tmp_path: Path) -> None:
    """FFmpeg is a process of its own: SIGKILL the server while an export's FFmpeg is
    starting, and that FFmpeg runs on through the restart. What it writes after the
    start-up sweep must not stay in the data dir (it would until the next start-up).

    The FFmpeg is held by a wrapper until the restarted server is ready. Sparrow kills
    its FFmpeg when the server dies (``setpriv --pdeathsig``); the wrapper runs it in a
    background subshell, which does not inherit that, as where ``setpriv`` is missing."""
    data_dir, log = tmp_path / "data", tmp_path / "server.log"
    started, go, done = tmp_path / "started", tmp_path / "go", tmp_path / "done"
    wrapper = tmp_path / "ffmpeg"
    wrapper.write_text(
        "#!/bin/sh\n"
        'case "$*" in *"/exports/"*)\n'
        f'  ( touch "{started}"; i=0\n'
        f'    while [ ! -e "{go}" ] && [ $i -lt 300 ]; do sleep 0.05; i=$((i+1)); done\n'
        f'    "{ffmpeg_exe()}" "$@"; status=$?; touch "{done}"; exit $status ) &\n'
        "  wait $!; exit $?;;\n"
        "esac\n"
        f'exec "{ffmpeg_exe()}" "$@"\n'
    )
    wrapper.chmod(0o755)
    ledger = Ledger()
    answers: list[httpx.Response | Exception] = []
    with (
        mock_server(data_dir, log, STEP_MS, SPARROW_FFMPEG=str(wrapper)) as (proc, base),
        httpx.Client(base_url=base, timeout=DEADLINE_S) as client,
    ):
        chain_id, _root = upload(client, ledger, SAMPLE.read_bytes())

        def export() -> None:
            try:
                answers.append(client.post(f"/api/chains/{chain_id}/export", json={}))
            except httpx.TransportError as exc:
                answers.append(exc)

        sender = threading.Thread(target=export)
        sender.start()
        try:
            kill_when(proc, started.exists, 0.0, poll_s=0.01)
        finally:
            sender.join(DEADLINE_S)
    assert len(answers) == 1 and isinstance(answers[0], httpx.TransportError)

    folder = MediaStore(data_dir).chain_exports(chain_id)
    with (
        mock_server(data_dir, log, STEP_MS, SPARROW_FFMPEG=str(wrapper)) as (proc, base),
        httpx.Client(base_url=base, timeout=DEADLINE_S) as client,
    ):
        go.touch()  # the sweep is done: let the old FFmpeg write
        deadline = time.monotonic() + DEADLINE_S
        while not done.exists():
            assert time.monotonic() < deadline, "the old FFmpeg did not end"
            time.sleep(0.01)
        assert sorted(folder.iterdir()) == []
        made = client.post(f"/api/chains/{chain_id}/export", json={})
        assert made.status_code == 200, made.text
        assert wav_frames(made.content) > 0
        key = made.headers["etag"].strip('"')
        assert [f.name for f in folder.iterdir()] == [f"{key}.wav"]
