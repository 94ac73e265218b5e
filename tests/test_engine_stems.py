"""Stem engines: Demucs on the tiny random-weight HTDemucs, the mock, and the builder."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from helpers import ML_REASON, ml_installed

from sparrow.engines import UnavailableEngine, build_stem_engine
from sparrow.engines.base import STEM_NAMES, Audio, Cancelled, Progress, StemEngine
from sparrow.engines.mock_stems import MockStemEngine, split_bands
from sparrow.errors import EngineUnavailable, GenerationFailed
from sparrow.settings import Settings

if TYPE_CHECKING:
    from sparrow.engines.demucs import DemucsEngine
    from sparrow.engines.tiny import TinyModels


def _demucs(name: str, repo: Path) -> DemucsEngine:
    from sparrow.engines.demucs import DemucsEngine  # torch: only where the real engine runs

    return DemucsEngine(name, repo=repo, device="cpu")


SR = 44_100


@pytest.fixture(scope="module")
def demucs(tiny_models: TinyModels) -> DemucsEngine:
    engine = _demucs(tiny_models.demucs_name, tiny_models.demucs)
    engine.load()
    return engine


def mix(seconds: float, seed: int = 0) -> Audio:
    """Stereo noise plus a low and a mid tone: something in every band."""
    frames = round(seconds * SR)
    t = np.arange(frames)[:, None] / SR
    rng = np.random.default_rng(seed)
    tones = 0.3 * np.sin(2 * np.pi * 80 * t) + 0.2 * np.sin(2 * np.pi * 1000 * t)
    return (tones + 0.05 * rng.standard_normal((frames, 2))).astype(np.float32)


def ignore(fraction: float) -> None:
    pass


def cancel_on_call(n: int) -> tuple[Progress, list[float]]:
    seen: list[float] = []

    def progress(fraction: float) -> None:
        seen.append(fraction)
        if len(seen) == n:
            raise Cancelled

    return progress, seen


def assert_stems(stems: dict[str, Audio], frames: int, channels: int = 2) -> None:
    assert list(stems) == list(STEM_NAMES)
    for stem in stems.values():
        assert stem.shape == (frames, channels) and stem.dtype == np.float32
        assert np.isfinite(stem).all()


# Demucs


def test_demucs_loads_from_a_local_repo(tiny_models: TinyModels) -> None:
    engine = _demucs(tiny_models.demucs_name, tiny_models.demucs)
    before = engine.info()
    assert (before.engine, before.model, before.device, before.loaded, before.dtype) == (
        "demucs",
        tiny_models.demucs_name,
        "cpu",
        False,
        None,
    )
    engine.load()
    loaded = engine._loaded
    engine.load()
    assert engine._loaded is loaded
    after = engine.info()
    assert (after.loaded, after.dtype) == (True, "float32")
    assert (engine.sample_rate, engine.channels) == (SR, 2)


def test_demucs_separates_into_four_stems(demucs: DemucsEngine) -> None:
    audio = mix(2.5)
    seen: list[float] = []
    stems = demucs.separate(audio, seen.append)
    assert_stems(stems, len(audio))
    assert all(np.abs(stem).max() > 0 for stem in stems.values())
    # 1 s segments, 0.75 s apart, over 2.5 s: 4 chunks.
    assert len(seen) == 4
    assert seen == sorted(seen) and seen[0] > 0 and seen[-1] == 1.0
    again = demucs.separate(audio, ignore)
    assert all(np.array_equal(stems[name], again[name]) for name in stems)  # deterministic


def test_demucs_cancel_propagates_from_within_a_chunk(demucs: DemucsEngine) -> None:
    progress, seen = cancel_on_call(2)
    with pytest.raises(Cancelled):
        demucs.separate(mix(3.0), progress)
    assert len(seen) == 2  # no chunk ran after the cancel
    assert_stems(demucs.separate(mix(0.5), ignore), round(0.5 * SR))


@pytest.mark.parametrize("frames", [0, 1, 2, 441, 30_000])
def test_demucs_short_input(demucs: DemucsEngine, frames: int) -> None:
    seen: list[float] = []
    stems = demucs.separate(mix(1.0)[:frames], seen.append)
    assert_stems(stems, frames)
    assert seen and seen[-1] == 1.0 and seen == sorted(seen)


def test_demucs_silence_stays_silent(demucs: DemucsEngine) -> None:
    stems = demucs.separate(np.zeros((SR // 2, 2), np.float32), ignore)
    assert_stems(stems, SR // 2)
    assert all(np.abs(stem).max() < 1e-6 for stem in stems.values())


def test_demucs_rejects_a_mix_of_the_wrong_shape(demucs: DemucsEngine) -> None:
    with pytest.raises(GenerationFailed, match="float32"):
        demucs.separate(np.zeros((SR, 1), np.float32), ignore)
    with pytest.raises(GenerationFailed, match="float32"):
        demucs.separate(np.zeros((SR, 2), np.float64), ignore)


def test_demucs_missing_model_or_repo_is_unavailable(
    tiny_models: TinyModels, tmp_path: Path
) -> None:
    with pytest.raises(EngineUnavailable, match="'nope'"):
        _demucs("nope", tiny_models.demucs).load()
    missing = tmp_path / "no-repo"
    with pytest.raises(EngineUnavailable, match="not a folder"):
        _demucs(tiny_models.demucs_name, missing).load()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / f"{tiny_models.demucs_name}.th").write_bytes(b"not a model")
    engine = _demucs(tiny_models.demucs_name, broken)
    with pytest.raises(EngineUnavailable, match="could not be loaded"):
        engine.load()
    assert not engine.info().loaded


# The mock


def test_mock_stems_sum_to_the_mix() -> None:
    audio = mix(1.3)
    stems = MockStemEngine(step_ms=0).separate(audio, ignore)
    assert_stems(stems, len(audio))
    np.testing.assert_allclose(sum(stems.values()), audio, atol=1e-5)


def test_mock_splits_by_band() -> None:
    t = np.arange(SR)[:, None] / SR  # 1 s: every tone falls on an FFT bin
    tones = {"bass": 80, "other": 250, "vocals": 1000, "drums": 8000}
    audio = sum(np.sin(2 * np.pi * hz * t) for hz in tones.values())
    stems = MockStemEngine(step_ms=0).separate(np.repeat(audio, 2, 1).astype(np.float32), ignore)
    for name, hz in tones.items():
        expected = np.repeat(np.sin(2 * np.pi * hz * t), 2, 1)
        np.testing.assert_allclose(stems[name], expected, atol=1e-4, err_msg=name)


def test_mock_is_deterministic_with_exact_frames() -> None:
    engine = MockStemEngine(step_ms=0)
    for frames in [0, 1, 881, 44_100, 44_101]:
        audio = mix(1.1)[:frames]
        a, b = engine.separate(audio, ignore), engine.separate(audio.copy(), ignore)
        assert_stems(a, frames)
        assert all(np.array_equal(a[name], b[name]) for name in STEM_NAMES)


def test_mock_progress_and_cancel() -> None:
    engine = MockStemEngine(step_ms=0)
    seen: list[float] = []
    engine.separate(mix(0.5), seen.append)
    assert len(seen) == 25 and seen == sorted(seen) and seen[-1] == 1.0  # one per 20 ms
    progress, seen = cancel_on_call(2)
    with pytest.raises(Cancelled):
        engine.separate(mix(0.5), progress)
    assert len(seen) == 2
    with pytest.raises(GenerationFailed):
        engine.separate(np.zeros((10, 1), np.float32), ignore)


def test_split_bands_leaves_silence_silent() -> None:
    stems = split_bands(np.zeros((100, 2), np.float32), SR)
    assert all(not stem.any() for stem in stems.values())


# The builder


def test_build_stem_engine_follows_the_settings(tmp_path: Path) -> None:
    mock = build_stem_engine(Settings(data_dir=tmp_path, engine="mock", mock_step_ms=7))
    assert isinstance(mock, MockStemEngine) and mock.step_ms == 7


def test_build_stem_engine_builds_demucs_from_the_settings(tmp_path: Path) -> None:
    if not ml_installed():
        pytest.skip(ML_REASON)
    from sparrow.engines.demucs import DemucsEngine

    repo = tmp_path / "repo"
    real = build_stem_engine(
        Settings(data_dir=tmp_path, demucs_model="m", demucs_repo=repo, device="cpu")
    )
    assert isinstance(real, DemucsEngine)
    assert (real.model, real.repo, real.device, real.info().loaded) == ("m", repo, "cpu", False)


def test_build_stem_engine_without_demucs_is_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "sparrow.engines.demucs", None)  # import fails
    engine: StemEngine = build_stem_engine(Settings(data_dir=tmp_path))
    assert isinstance(engine, UnavailableEngine)
    assert (engine.info().engine, engine.info().loaded) == ("demucs", False)
    with pytest.raises(EngineUnavailable, match="demucs"):
        engine.load()
    with pytest.raises(EngineUnavailable, match="demucs"):
        engine.separate(mix(0.1), ignore)
