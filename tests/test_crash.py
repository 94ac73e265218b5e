"""kill -9 during uploads: after a restart nothing acknowledged is lost and nothing half-made stays.

These run the real ``sparrow serve`` command in a child process on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from pathlib import Path

import httpx
from crashes import integrity_ok, kill_9
from helpers import SAMPLE
from live import free_port, server_process

from sparrow.media import MediaStore


def test_kill_during_uploads_loses_nothing_acknowledged(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    acknowledged: list[dict[str, object]] = []
    for round_ in range(3):
        with server_process(data_dir, port, SPARROW_ENGINE="mock") as proc:
            with httpx.Client(base_url=base, timeout=30) as client:
                created = client.post(
                    "/api/chains", files={"file": ("sample.flac", SAMPLE.read_bytes())}
                )
                assert created.status_code == 201
                acknowledged.append(created.json())
            # An upload in flight: half a body on the wire when the process dies.
            sock = socket.create_connection(("127.0.0.1", port))
            body = SAMPLE.read_bytes()
            sock.sendall(
                b"POST /api/chains HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: multipart/form-data; boundary=b\r\n"
                b"Content-Length: %d\r\n\r\n"
                % (len(body) + 200)
                + b'--b\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\n'
                + body[: len(body) // 2]
            )
            media = MediaStore(data_dir)
            deadline = time.monotonic() + 10
            while not any(media.tmp_dir.iterdir()):  # the upload is being written
                assert time.monotonic() < deadline
                time.sleep(0.01)
            time.sleep(0.05 * round_)
            kill_9(proc)
            sock.close()

    assert any(media.tmp_dir.iterdir()), "the killed upload should have left a temp file"
    # A crash between publishing a file and inserting its row leaves an orphan: fake one.
    orphan = media.node_audio("f" * 32, "e" * 32)
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"RIFF")

    with (
        server_process(data_dir, port, SPARROW_ENGINE="mock"),
        httpx.Client(base_url=base, timeout=30) as client,
    ):
        listed = client.get("/api/chains").json()
        assert listed["total"] == len(acknowledged) == 3
        for created_body in acknowledged:
            root = created_body["root"]
            assert isinstance(root, dict)
            audio = client.get(f"/api/nodes/{root['id']}/audio")
            assert audio.status_code == 200
            assert audio.headers["etag"] == f'"{hashlib.sha256(audio.content).hexdigest()}"'
        assert list(media.tmp_dir.iterdir()) == []
        assert not orphan.exists() and not orphan.parent.exists()

    integrity_ok(data_dir)


def test_kill_during_decoding_leaves_no_chain_and_no_file(tmp_path: Path) -> None:
    """FFmpeg made slow by a wrapper, so the kill lands while the upload is being decoded."""
    from sparrow.audio import ffmpeg_exe

    marker = tmp_path / "decoding"
    wrapper = tmp_path / "slow-ffmpeg"
    # Only the upload's runs are slowed (readiness probes run FFmpeg too).
    wrapper.write_text(
        f'#!/bin/sh\ncase "$*" in *upload-*) touch "{marker}"; sleep 1;; esac\n'
        f'exec "{ffmpeg_exe()}" "$@"\n'
    )
    wrapper.chmod(0o755)
    data_dir = tmp_path / "data"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with server_process(data_dir, port, SPARROW_ENGINE="mock", SPARROW_FFMPEG=str(wrapper)) as proc:
        errors: list[BaseException] = []

        def send() -> None:
            try:
                httpx.post(
                    f"{base}/api/chains",
                    files={"file": ("sample.flac", SAMPLE.read_bytes())},
                    timeout=30,
                )
            except httpx.TransportError as exc:
                errors.append(exc)

        sender = threading.Thread(target=send)
        sender.start()
        deadline = time.monotonic() + 10
        while not marker.exists():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        kill_9(proc)
        sender.join(30)
        assert errors, "the upload must not have been acknowledged"

    media = MediaStore(data_dir)
    assert any(media.audio_dir.iterdir()), "the chain folder was made before the kill"
    with (
        server_process(data_dir, port, SPARROW_ENGINE="mock"),
        httpx.Client(base_url=base, timeout=30) as client,
    ):
        assert client.get("/api/chains").json()["total"] == 0
        assert list(media.audio_dir.iterdir()) == []
        assert list(media.tmp_dir.iterdir()) == []
