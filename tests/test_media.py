"""The start-up sweep removes exactly what no row refers to."""

from __future__ import annotations

from pathlib import Path

import pytest

from sparrow.media import MediaStore


def test_sweep_keeps_known_files_and_removes_the_rest(tmp_path: Path) -> None:
    media = MediaStore(tmp_path)
    media.ensure()
    kept = media.node_audio("c1", "n1")
    kept.parent.mkdir()
    kept.write_bytes(b"RIFF")
    stem = media.stem_file("c1", "n1", "drums")
    stem.parent.mkdir(parents=True)
    stem.write_bytes(b"RIFF")
    export = media.chain_exports("c1") / "abc.wav"
    export.parent.mkdir()
    export.write_bytes(b"RIFF")
    leftovers = [
        media.stem_file("c1", "n2", "bass"),  # stems not ready (killed mid-separation)
        media.node_stems("c1", "n1") / ".vocals.wav.1a2b.tmp",  # a stem killed mid-write
        media.stem_file("c9", "n9", "drums"),  # stems of a chain that was never created
        media.chain_exports("c1") / ".abc.mp3.1a2b.tmp",  # an export killed mid-write
        media.chain_exports("c9") / "abc.wav",  # an export of a deleted chain
        media.node_audio("c1", "gone"),  # its row was discarded
        media.chain_dir("c1") / ".n2.wav.1a2b.tmp",  # a decode killed mid-write
        media.node_audio("c9", "n9"),  # a chain that was never created
        media.tmp_dir / "upload-123",  # an upload in flight
    ]
    for path in leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")

    removed = media.sweep({"c1"}, {"n1"}, {"n1"})

    assert kept.read_bytes() == b"RIFF" and stem.read_bytes() == b"RIFF"
    assert export.read_bytes() == b"RIFF"
    assert not any(p.exists() for p in leftovers)
    assert not media.chain_dir("c9").exists()
    assert removed == 9


@pytest.mark.parametrize("count", [3, 200])  # one by one, and by listing the folders once
def test_removing_nodes_deletes_their_audio_and_stems_only(tmp_path: Path, count: int) -> None:
    media = MediaStore(tmp_path)
    media.ensure()
    gone = [f"g{i}" for i in range(count)]
    for node_id in [*gone, "kept"]:
        audio = media.node_audio("c1", node_id)
        audio.parent.mkdir(exist_ok=True)
        audio.write_bytes(b"RIFF")
        stem = media.stem_file("c1", node_id, "drums")
        stem.parent.mkdir(parents=True)
        stem.write_bytes(b"RIFF")

    media.remove_nodes("c1", [*gone, "never-had-files"])

    assert [p.name for p in media.chain_dir("c1").iterdir()] == ["kept.wav"]
    assert [p.name for p in (media.stems_dir / "c1").iterdir()] == ["kept"]
    assert media.stem_file("c1", "kept", "drums").read_bytes() == b"RIFF"
