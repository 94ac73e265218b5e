"""The MusicGen engine on a tiny random-weight model loaded from a folder, and the tiny Demucs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import ML_REASON

pytest.importorskip("torch", reason=ML_REASON)
pytest.importorskip("transformers", reason=ML_REASON)
pytest.importorskip("demucs", reason=ML_REASON)

import torch
from demucs.api import Separator
from demucs.pretrained import get_model

from sparrow.engines.base import Audio, Cancelled, Continuation, frames_for
from sparrow.engines.musicgen import MusicGenEngine, Window, plan_windows
from sparrow.engines.tiny import DEMUCS_SOURCES, TinyModels, make_tiny_musicgen
from sparrow.errors import EngineUnavailable, GenerationFailed
from sparrow.models import Sampling

SR = 32_000


# Every engine test runs with both decoding loops: transformers' generate and Sparrow's own.
LOOPS = ["transformers", "sparrow"]


@pytest.fixture(scope="module", params=LOOPS)
def engine(tiny_models: TinyModels, request: pytest.FixtureRequest) -> MusicGenEngine:
    engine = MusicGenEngine(str(tiny_models.musicgen), device="cpu", decoder=request.param)
    engine.load()
    assert engine.info().extra == {"decoder": request.param}
    return engine


@pytest.fixture(scope="module", params=LOOPS)
def short_window(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> MusicGenEngine:
    """The same tiny model with a 1 s window (50 codes), so windowing costs little."""
    folder = make_tiny_musicgen(tmp_path_factory.mktemp("short") / "musicgen", window_s=1.0)
    return MusicGenEngine(str(folder), device="cpu", decoder=request.param)


@pytest.fixture(scope="module", params=LOOPS)
def stereo(tiny_models: TinyModels, request: pytest.FixtureRequest) -> MusicGenEngine:
    engine = MusicGenEngine(str(tiny_models.musicgen_stereo), device="cpu", decoder=request.param)
    engine.load()
    assert (engine.channels, engine.info().extra) == (2, {"decoder": request.param})
    return engine


def noise(seconds: float, seed: int = 0, channels: int = 1) -> Audio:
    rng = np.random.default_rng(seed)
    return (0.1 * rng.standard_normal((round(seconds * SR), channels))).astype(np.float32)


def ask(context: Audio, duration_s: float, *seeds: int, **params: Any) -> Continuation:
    return Continuation(
        context, ("jazz piano",) * len(seeds), seeds, Sampling(duration_s=duration_s, **params)
    )


def ignore(fraction: float) -> None:
    pass


def test_loads_once_from_a_folder(tiny_models: TinyModels) -> None:
    engine = MusicGenEngine(str(tiny_models.musicgen), device="cpu")
    before = engine.info()
    assert (before.engine, before.loaded, before.dtype, before.device) == (
        "musicgen",
        False,
        None,
        "cpu",
    )
    engine.load()
    model = engine._loaded
    engine.load()
    assert engine._loaded is model
    after = engine.info()
    assert (after.loaded, after.dtype, after.model) == (True, "float32", str(tiny_models.musicgen))
    assert (engine.sample_rate, engine.channels) == (SR, 1)


@pytest.mark.parametrize("missing", ["absolute", "relative"])
def test_a_missing_folder_is_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, missing: str
) -> None:
    monkeypatch.chdir(tmp_path)
    name = str(tmp_path / "nope") if missing == "absolute" else "./nope/model"
    engine = MusicGenEngine(name, device="cpu")
    with pytest.raises(EngineUnavailable, match="nope"):
        engine.load()
    assert not engine.info().loaded


def test_a_broken_folder_is_unavailable(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(EngineUnavailable, match="could not be loaded"):
        MusicGenEngine(str(tmp_path), device="cpu").load()


@pytest.mark.parametrize(("context_s", "duration_s"), [(1.0, 0.5), (0.7, 1.234), (0.0, 0.51)])
def test_exact_frame_counts(engine: MusicGenEngine, context_s: float, duration_s: float) -> None:
    out = engine.generate(ask(noise(context_s), duration_s, 1, 2), ignore)
    assert [a.shape for a in out] == [(frames_for(duration_s, SR), 1)] * 2
    assert all(a.dtype == np.float32 and np.isfinite(a).all() and a.std() > 0 for a in out)


@pytest.mark.parametrize(("context_s", "duration_s"), [(1.0, 0.5), (0.0, 0.77)])
def test_a_stereo_checkpoint_gives_stereo_audio(
    stereo: MusicGenEngine, context_s: float, duration_s: float
) -> None:
    context = noise(context_s, channels=2)
    alone = stereo.generate(ask(context, duration_s, 7), ignore)
    out = stereo.generate(ask(context, duration_s, 6, 7), ignore)
    assert [a.shape for a in out] == [(frames_for(duration_s, SR), 2)] * 2
    assert np.array_equal(out[1], alone[0])  # a seed's audio, alone or in a batch
    left, right = out[0].T
    assert left.std() > 0 and right.std() > 0 and not np.array_equal(left, right)
    with pytest.raises(GenerationFailed, match="2 channel"):
        stereo.generate(ask(noise(1.0), 0.5, 1), ignore)  # a mono context


def test_seeds_give_different_audio(engine: MusicGenEngine) -> None:
    a, b = engine.generate(ask(noise(1), 0.5, 1, 2), ignore)
    assert not np.array_equal(a, b)


def test_a_seed_gives_the_same_audio_alone_or_in_a_batch(
    engine: MusicGenEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    context = noise(1.0, seed=3)
    (alone,) = engine.generate(ask(context, 0.7, 7), ignore)
    again = engine.generate(ask(context, 0.7, 7), ignore)[0]
    codec: Any = engine._ready().model.audio_encoder
    encode, encoded = codec.encode, []

    def counted(*args: Any, **kwargs: Any) -> Any:
        encoded.append(args)
        return encode(*args, **kwargs)

    monkeypatch.setattr(codec, "encode", counted)
    in_batch = engine.generate(ask(context, 0.7, 5, 6, 7), ignore)[2]
    assert np.array_equal(alone, again)
    assert np.array_equal(alone, in_batch)
    assert len(encoded) == 1  # the siblings' shared context went through Encodec once


def test_each_sibling_is_generated_from_its_own_prompt(engine: MusicGenEngine) -> None:
    """One batch, one text per row: rows with the same seed and text come out the same,
    a row with another text (of another length, so padded) differently."""
    context, sampling = noise(0.5), Sampling(duration_s=0.4)
    same = engine.generate(Continuation(context, ("jazz", "jazz"), (5, 5), sampling), ignore)
    assert np.array_equal(same[0], same[1])
    mixed = engine.generate(
        Continuation(context, ("jazz", "a slow ambient drone"), (5, 5), sampling), ignore
    )
    assert not np.allclose(mixed[0], mixed[1], atol=1e-4)
    assert mixed[0].shape == mixed[1].shape == (frames_for(0.4, SR), 1)


def test_text_only_when_the_context_is_empty(engine: MusicGenEngine) -> None:
    empty = np.zeros((0, 1), np.float32)
    request = Continuation(empty, ("", ""), (1, 2), Sampling(duration_s=0.5))
    a, b = engine.generate(request, ignore)
    assert a.shape == b.shape == (frames_for(0.5, SR), 1)
    assert not np.array_equal(a, b)


def test_guidance_and_sampling_parameters_apply(engine: MusicGenEngine) -> None:
    context = noise(0.5)
    guided = engine.generate(ask(context, 0.3, 1, cfg_coef=3.0), ignore)[0]
    unguided = engine.generate(ask(context, 0.3, 1, cfg_coef=1.0), ignore)[0]
    assert not np.array_equal(guided, unguided)
    # top_k 1, or a top_p too small to pass the second token, is the argmax: seeds stop mattering.
    for params in ({"top_k": 1}, {"top_k": 0, "top_p": 1e-9}):
        a, b = engine.generate(ask(context, 0.3, 1, 2, **params), ignore)
        assert np.array_equal(a, b), params


def test_progress_is_monotonic_and_reaches_one(engine: MusicGenEngine) -> None:
    seen: list[float] = []
    engine.generate(ask(noise(0.5), 0.5, 1, 2, 3), seen.append)
    assert len(seen) == 25 + 3  # one per decoding step: 25 codes plus the delay pattern's 3
    assert seen == sorted(seen) and seen[0] > 0 and seen[-1] == 1.0


def test_cancel_from_progress_propagates_and_stops(engine: MusicGenEngine) -> None:
    calls = 0

    def progress(fraction: float) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise Cancelled

    with pytest.raises(Cancelled):
        engine.generate(ask(noise(0.5), 2.0, 1, 2), progress)
    assert calls == 3


def test_failures_while_generating_are_generation_failed(engine: MusicGenEngine) -> None:
    with pytest.raises(GenerationFailed, match="temperature"):
        engine.generate(ask(noise(0.5), 0.2, 1, temperature=0.0), ignore)
    stereo = np.zeros((SR, 2), np.float32)
    with pytest.raises(GenerationFailed, match="channel"):
        engine.generate(ask(stereo, 0.2, 1), ignore)


def test_plan_windows() -> None:
    # 30 s windows of 1500 codes; stride 900 (18 s).
    assert plan_windows(500, 500, 1500) == [Window(500, 500)]
    assert plan_windows(1500, 500, 1500) == [Window(1000, 500)]  # the prompt gives way
    assert plan_windows(0, 1500, 1500) == [Window(0, 1500)]
    assert plan_windows(500, 1500, 1500) == [Window(500, 1000), Window(1000, 500)]
    assert plan_windows(0, 3000, 1500) == [Window(0, 1500), Window(600, 900), Window(900, 600)]
    for context, total in [(0, 6000), (1500, 6000), (3, 4501)]:
        plan = plan_windows(context, total, 1500)
        assert sum(w.new for w in plan) == total
        assert all(w.prompt + w.new <= 1500 and w.new > 0 for w in plan)


def test_past_the_window_in_overlapping_windows(short_window: MusicGenEngine) -> None:
    context, duration_s = noise(0.5), 2.47
    seen: list[float] = []
    (alone,) = short_window.generate(ask(context, duration_s, 9), seen.append)
    codes = -(-frames_for(duration_s, SR) // 640)
    windows = plan_windows(25, codes, 50)
    assert len(windows) > 3
    assert alone.shape == (frames_for(duration_s, SR), 1)
    assert len(seen) == sum(w.new + 3 for w in windows)
    assert seen == sorted(seen) and seen[-1] == 1.0
    in_batch = short_window.generate(ask(context, duration_s, 8, 9), ignore)[1]
    assert np.array_equal(alone, in_batch)


def test_text_only_past_the_window_continues_its_own_audio(short_window: MusicGenEngine) -> None:
    empty = np.zeros((0, 1), np.float32)
    a, b = short_window.generate(
        Continuation(empty, ("drums", "drums"), (1, 2), Sampling(duration_s=1.6)), ignore
    )
    assert a.shape == b.shape == (frames_for(1.6, SR), 1)
    assert not np.array_equal(a, b)


def test_tiny_demucs_separates_into_four_stems(tiny_models: TinyModels) -> None:
    model = get_model(tiny_models.demucs_name, repo=tiny_models.demucs)
    assert tuple(model.sources) == DEMUCS_SOURCES
    separator = Separator(
        model=tiny_models.demucs_name, repo=tiny_models.demucs, device="cpu", progress=False
    )
    mix = 0.1 * torch.randn(2, 2 * 44_100, generator=torch.Generator().manual_seed(0))
    _, stems = separator.separate_tensor(mix, 44_100)
    assert sorted(stems) == sorted(DEMUCS_SOURCES)
    assert all(tuple(stem.shape) == (2, 2 * 44_100) for stem in stems.values())


def checked(folder: Path) -> MusicGenEngine:
    """The engine on Sparrow's loop, loaded with the self-check a CUDA load runs."""
    engine = MusicGenEngine(str(folder), device="cpu", decoder="sparrow", check_loop=True)
    engine.load()
    return engine


def test_the_loop_self_check_passes_where_the_loop_is_exact(tiny_models: TinyModels) -> None:
    """The check a CUDA load runs, run here on the CPU: Sparrow's loop keeps the job."""
    for folder in (tiny_models.musicgen, tiny_models.musicgen_stereo):
        engine = checked(folder)
        assert engine.info().extra == {"decoder": "sparrow", "decoder_check": "passed"}


def test_a_loop_that_disagrees_falls_back_to_generate(
    tiny_models: TinyModels, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from sparrow.engines.decoding import MusicGenDecoder

    real = MusicGenDecoder.generate

    def off_by_one(self: MusicGenDecoder, *args: Any, **kwargs: Any) -> torch.Tensor:
        codes = real(self, *args, **kwargs).clone()
        codes[0, 1, 5] = (codes[0, 1, 5] + 1) % 2048
        return codes

    monkeypatch.setattr(MusicGenDecoder, "generate", off_by_one)
    engine = checked(tiny_models.musicgen)
    info = engine.info().extra
    assert info["decoder"] == "transformers"
    assert info["decoder_check"].startswith("not used: its greedy tokens differ")
    assert "codebook 1, code 5" in info["decoder_check"]
    assert any("decoding loop is not used" in r.getMessage() for r in caplog.records)
    # It still generates, through transformers' generate.
    (audio,) = engine.generate(ask(noise(0.5), 0.3, 1), ignore)
    assert audio.shape == (frames_for(0.3, SR), 1)

    def broken(self: MusicGenDecoder, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise RuntimeError("CUDA graph capture failed")

    monkeypatch.setattr(MusicGenDecoder, "generate", broken)
    engine = checked(tiny_models.musicgen)
    assert engine.info().extra["decoder_check"] == (
        "not used: it failed on this device (RuntimeError: CUDA graph capture failed)"
    )


def test_the_self_check_says_when_a_row_beside_others_differs(
    tiny_models: TinyModels, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check also decodes a row beside another that joined first: where the device
    rounds a batch differently (made so here), the loop still serves, and says so."""
    from sparrow.engines.decoding import MusicGenDecoder

    real = MusicGenDecoder._codes_of

    def skewed(self: MusicGenDecoder, slots: Any, decoding: Any) -> torch.Tensor:
        codes = real(self, slots, decoding)
        if len(self.live) > 1:  # finished while another row was in flight
            codes[0, 3] = (codes[0, 3] + 1) % 2048
        return codes

    monkeypatch.setattr(MusicGenDecoder, "_codes_of", skewed)
    engine = checked(tiny_models.musicgen)
    info = engine.info().extra
    assert info["decoder"] == "sparrow"
    assert info["decoder_check"] == (
        "passed; a row beside others differs from alone (first at codebook 0, code 3, of 79)"
    )


@pytest.mark.parametrize(("requested", "expected"), [(0, 1), (2, 2)])
def test_generation_on_the_cpu_runs_with_the_chosen_threads(
    tiny_models: TinyModels, monkeypatch: pytest.MonkeyPatch, requested: int, expected: int
) -> None:
    """A narrow model decodes on one thread unless told otherwise (SPARROW_TORCH_THREADS);
    the count is the caller's again afterwards."""
    from sparrow.engines.torch_device import cpu_threads_for

    assert cpu_threads_for(0, 1024) >= 1 and cpu_threads_for(3, 32) == 3
    engine = MusicGenEngine(str(tiny_models.musicgen), device="cpu", threads=requested)
    seen: list[int] = []

    def watching(fraction: float) -> None:
        seen.append(torch.get_num_threads())

    before = torch.get_num_threads()
    engine.generate(ask(noise(0.5), 0.2, 1), watching)
    assert seen and set(seen) == {expected}
    assert torch.get_num_threads() == before
