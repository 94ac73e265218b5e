"""Continuations at the loudness of what they continue, measured with FFmpeg's ebur128.

The mock engine renders every continuation at one level whatever its context, so
without matching a quiet parent's continuation would be far louder than its parent
and a loud one's quieter; with it, both land within 1 LU of their context.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
from helpers import branch, upload, wait_for_status
from probe import ebur128

from sparrow.audio import loudness, render_music, write_wav

pytestmark = pytest.mark.anyio

RATE = 44_100


async def root_at(client: httpx.AsyncClient, tmp_path: Path, level: float) -> tuple[str, Path]:
    """A 6 s stereo root scaled by ``level`` (clipped): its id, and its file."""
    clip = tmp_path / f"root-{level}.wav"
    music = np.clip(render_music(6.0, RATE, 2, seed=5) * level, -1, 1).astype(np.float32)
    write_wav(clip, music, RATE)
    response = await upload(client, clip)
    assert response.status_code == 201, response.text
    return response.json()["root"]["id"], clip


async def continuation(
    client: httpx.AsyncClient, parent_id: str, tmp_path: Path, **body: object
) -> tuple[dict[str, object], Path]:
    (node,) = await branch(client, parent_id, duration_s=3, seed=9, **body)
    (done,) = await wait_for_status(client, [node["id"]], "ready", "error")
    assert done["status"] == "ready", done
    path = tmp_path / f"{node['id']}.wav"
    path.write_bytes((await client.get(f"/api/nodes/{node['id']}/audio")).content)
    return done, path


@pytest.mark.parametrize("level", [0.02, 1.6])  # about -46 and -15 LUFS
async def test_a_continuation_lands_within_1_lu_of_its_context(
    client: httpx.AsyncClient, tmp_path: Path, level: float
) -> None:
    root_id, root_file = await root_at(client, tmp_path, level)
    context, _ = ebur128(root_file)  # 6 s: the whole root is the 10 s context
    node, path = await continuation(client, root_id, tmp_path)
    assert node["params"]["match_loudness"] is True  # type: ignore[index]
    integrated, peak = ebur128(path)
    assert abs(integrated - context) <= 1.0, (context, integrated)
    assert peak <= -1.0, peak
    assert node["frames"] == 3 * 32_000  # exact frames kept


async def test_without_matching_the_engine_s_level_is_kept(
    client: httpx.AsyncClient, tmp_path: Path
) -> None:
    quiet_id, _ = await root_at(client, tmp_path, 0.02)
    loud_id, _ = await root_at(client, tmp_path, 1.6)
    quiet, quiet_path = await continuation(client, quiet_id, tmp_path, match_loudness=False)
    _, loud_path = await continuation(client, loud_id, tmp_path, match_loudness=False)
    assert quiet["params"]["match_loudness"] is False  # type: ignore[index]
    # The mock's audio depends on the seed only: unmatched, both are the same file.
    assert quiet_path.read_bytes() == loud_path.read_bytes()
    _, matched_path = await continuation(client, quiet_id, tmp_path)
    assert matched_path.read_bytes() != quiet_path.read_bytes()


@pytest.mark.parametrize("value", ["yes", 1, None])
async def test_match_loudness_must_be_a_boolean(
    client: httpx.AsyncClient, tmp_path: Path, value: object
) -> None:
    root_id, _ = await root_at(client, tmp_path, 0.5)
    response = await client.post(
        f"/api/nodes/{root_id}/branch", json={"duration_s": 1, "match_loudness": value}
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "invalid_input"
    chain = (await client.get(f"/api/nodes/{root_id}")).json()["chain_id"]
    nodes = (await client.get(f"/api/chains/{chain}")).json()["nodes"]
    assert len(nodes) == 1  # nothing was created


async def test_passes_end_once_the_limiter_holds_all_of_the_audio(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A square wave is all peaks: the limiter takes as much loudness as it cuts from the
    peaks, so one pass shows that no gain reaches the target. Music under the limiter
    loses a fraction of the cut: its passes go on, each closer."""
    passes: list[float] = []
    one_pass = loudness._filtered

    async def counted(*args: object, **kwargs: object) -> tuple[np.ndarray, loudness.Loudness]:
        got = await one_pass(*args, **kwargs)  # type: ignore[arg-type]
        passes.append(got[1].integrated_lufs)
        return got

    monkeypatch.setattr(loudness, "_filtered", counted)
    seconds = np.arange(2 * 32_000) / 32_000
    square = 0.6 * np.sign(np.sin(2 * np.pi * 3 * seconds))[:, None].astype(np.float32)
    _, got = await loudness.match(square, 32_000, -12.0, folder=tmp_path)
    assert len(passes) == 1 and got.integrated_lufs < -12.0 - loudness.TOLERANCE_LU
    assert got.true_peak_dbtp <= loudness.TRUE_PEAK_CEILING_DBTP

    passes.clear()
    music = render_music(4.0, 32_000, 1, seed=3).astype(np.float32)
    _, got = await loudness.match(music, 32_000, -10.0, folder=tmp_path)
    assert len(passes) >= 2 and passes == sorted(passes)  # each pass louder, closer
    assert abs(got.integrated_lufs + 10.0) <= loudness.TOLERANCE_LU
    assert got.true_peak_dbtp <= loudness.TRUE_PEAK_CEILING_DBTP
