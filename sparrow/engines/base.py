"""The engine interface: what the worker asks of a generation engine.

An engine turns one batch of sibling continuations into audio. It runs in the
worker's thread (never on the event loop), owns its device, and reports
progress once per decoding step through a callback that may raise
``Cancelled`` to stop it: that exception must pass through the engine
untouched, so a cancel stops the batch within one step.

    load()        load the model once (idempotent); EngineUnavailable if it cannot
    info()        what ``/api/gpu`` shows; cheap, never loads
    generate()    one batch of siblings → one float32 array per seed

Failures are translated here, at the boundary: a model that cannot be loaded is
``EngineUnavailable``; anything that goes wrong while generating is
``GenerationFailed``. The worker records either on the nodes and carries on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

Audio = npt.NDArray[np.float32]  # (frames, channels)


class Cancelled(Exception):
    """Raised by a progress callback to stop the running batch."""


Progress = Callable[[float], None]
"""Called with the fraction done (0..1) after each decoding step; may raise ``Cancelled``."""


@dataclass(frozen=True)
class Continuation:
    """One branch request: ``len(seeds)`` siblings generated as one batch.

    ``context`` is the end of the audio of the path root→parent, already at the
    engine's ``sample_rate`` and ``channels`` (it may hold zero frames). The
    result for each seed holds exactly ``round(duration_s * sample_rate)``
    frames of new audio only: the context is not repeated.
    """

    context: Audio
    prompt: str
    duration_s: float
    seeds: tuple[int, ...]
    temperature: float = 1.0
    top_k: int = 250
    top_p: float = 0.0
    cfg_coef: float = 3.0

    @property
    def count(self) -> int:
        return len(self.seeds)


@dataclass(frozen=True)
class EngineInfo:
    engine: str
    model: str
    device: str
    loaded: bool
    dtype: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


class GenerationEngine(Protocol):
    @property
    def sample_rate(self) -> int:
        """Output (and context) sample rate; valid after ``load()``."""
        ...

    @property
    def channels(self) -> int:
        """Output (and context) channel count; valid after ``load()``."""
        ...

    def info(self) -> EngineInfo: ...

    def load(self) -> None: ...

    def generate(self, request: Continuation, progress: Progress) -> list[Audio]: ...


def frames_for(duration_s: float, sample_rate: int) -> int:
    """The exact frame count of a requested duration."""
    return round(duration_s * sample_rate)
