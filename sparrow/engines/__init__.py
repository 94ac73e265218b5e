"""Generation and stem engines behind small interfaces (``sparrow.engines.base``)."""

from __future__ import annotations

import functools

from sparrow.engines.base import (
    STEM_NAMES,
    Audio,
    Batch,
    Cancelled,
    Continuation,
    Engine,
    EngineInfo,
    GenerationEngine,
    Progress,
    Row,
    StemEngine,
    frames_for,
)
from sparrow.engines.batching import Batcher, RowDecoder
from sparrow.errors import EngineUnavailable
from sparrow.settings import Settings


def build_engine(settings: Settings) -> GenerationEngine:
    """The engine the settings name; nothing is loaded yet.

    The MusicGen engine's module (and torch) is imported only when it is chosen,
    so the mock runs on an install without the ``ml`` extra.
    """
    if settings.engine == "mock":
        from sparrow.engines.mock import MockEngine

        return MockEngine(settings.mock_step_ms)
    try:
        from sparrow.engines.musicgen import MusicGenEngine
    except ImportError as exc:
        # Without the ``ml`` extra the server still starts; every job says why it cannot run.
        return UnavailableEngine(
            "musicgen",
            settings.musicgen_model,
            f"The musicgen engine needs torch and transformers (pip install 'sparrow[ml]'): {exc}.",
        )
    return MusicGenEngine(
        settings.musicgen_model,
        device=settings.device,
        decoder=settings.musicgen_decoder,
        threads=settings.torch_threads,
    )


def build_decoder(settings: Settings, engine: GenerationEngine) -> tuple[Engine, RowDecoder]:
    """Where ``engine``'s rows decode, and the engine as the worker then sees it: MusicGen
    in a process of its own (``SPARROW_ENGINE_PROCESS``, ``sparrow.engines.process``),
    any other engine in a ``Batcher`` thread of this process."""
    musicgen = settings.engine == "musicgen" and not isinstance(engine, UnavailableEngine)
    if settings.engine_process and musicgen:
        from sparrow.engines.process import DecodingProcess

        factory = functools.partial(build_engine, settings)
        process = DecodingProcess(factory, settings.max_batch, engine.info())
        return process.engine, process
    return engine, Batcher(engine, settings.max_batch)


def build_stem_engine(settings: Settings) -> StemEngine:
    """The stem engine the settings name (the mock with the mock engine); nothing is loaded yet.

    As for generation, Demucs (and torch) is imported only when it is chosen; without
    the ``ml`` extra the engine is unavailable, never silently the mock.
    """
    if settings.engine == "mock":
        from sparrow.engines.mock_stems import MockStemEngine

        return MockStemEngine(settings.mock_step_ms)
    try:
        from sparrow.engines.demucs import DemucsEngine
    except ImportError as exc:
        return UnavailableEngine(
            "demucs",
            settings.demucs_model,
            f"Stem separation needs torch and demucs (pip install 'sparrow[ml]'): {exc}.",
        )
    return DemucsEngine(settings.demucs_model, settings.demucs_repo, settings.device)


class UnavailableEngine:
    """An engine whose code cannot even be imported: it fails every job, never silently.

    It stands in for either kind: a GenerationEngine and a StemEngine.
    """

    def __init__(self, engine: str, model: str, reason: str) -> None:
        self._info = EngineInfo(engine=engine, model=model, device="none", loaded=False)
        self.reason = reason

    @property
    def sample_rate(self) -> int:
        raise EngineUnavailable(self.reason)

    @property
    def channels(self) -> int:
        raise EngineUnavailable(self.reason)

    def info(self) -> EngineInfo:
        return self._info

    def load(self) -> None:
        raise EngineUnavailable(self.reason)

    def batch(self) -> Batch:
        raise EngineUnavailable(self.reason)

    def generate(self, request: Continuation, progress: Progress) -> list[Audio]:
        raise EngineUnavailable(self.reason)

    def separate(self, audio: Audio, progress: Progress) -> dict[str, Audio]:
        raise EngineUnavailable(self.reason)


__all__ = [
    "STEM_NAMES",
    "Audio",
    "Batch",
    "Cancelled",
    "Continuation",
    "Engine",
    "EngineInfo",
    "GenerationEngine",
    "Progress",
    "Row",
    "StemEngine",
    "UnavailableEngine",
    "build_decoder",
    "build_engine",
    "build_stem_engine",
    "frames_for",
]
