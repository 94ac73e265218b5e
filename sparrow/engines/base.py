"""The engine interfaces: what the worker asks of a generation or a stem engine.

A generation engine turns one batch of sibling continuations into audio; a stem
engine splits one mix into ``STEM_NAMES``. Either runs in the worker's thread
(never on the event loop), owns its device, and reports progress once per unit
of work (a decoding step, a separated chunk) through a callback that may raise
``Cancelled`` to stop it: that exception must pass through the engine
untouched, so a cancel stops the work within one step.

    load()        load the model once (idempotent); EngineUnavailable if it cannot
    info()        what ``/api/gpu`` shows; cheap, never loads
    batch()       an empty ``Batch``: rows (siblings of any requests) decoded together
    generate()    one batch of siblings → one float32 array per seed
    separate()    one mix → one float32 array per stem, as long as the mix

A generation engine decodes **rows**: one sibling each, with its own context,
prompt, seed and sampling. ``batch()`` holds the rows in flight; the worker's
``sparrow.engines.batching.Batcher`` adds rows of many requests to it, steps it,
and takes out the finished ones (SPEC §5, batching across requests). A batch whose
rows may join between steps (``joins_midway``: Sparrow's loop, the mock) serves
continuous batching; one that decodes its rows from start to end in one call
(transformers' ``generate``) takes rows only while it is empty, those that ``fit``
together. ``generate()`` is one request decoded alone through the same batch.

Failures are translated here, at the boundary: a model that cannot be loaded is
``EngineUnavailable``; anything that goes wrong while generating or separating
is ``GenerationFailed``. The worker records either on the nodes and carries on.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from sparrow.errors import GenerationFailed
from sparrow.models import Sampling

Audio = npt.NDArray[np.float32]  # (frames, channels)


class Cancelled(Exception):
    """Raised by a progress callback to stop the running batch."""


Progress = Callable[[float], None]
"""Called with the fraction done (0..1) after each step of work; may raise ``Cancelled``."""

STEM_NAMES: tuple[str, ...] = ("drums", "bass", "other", "vocals")
"""The stems every stem engine returns, in this order."""


@dataclass(frozen=True)
class Continuation:
    """One branch request: ``len(seeds)`` siblings generated as one batch.

    ``context`` is the end of the audio of the path root→parent, already at the
    engine's ``sample_rate`` and ``channels`` (it may hold zero frames). Sibling i
    is generated from ``prompts[i]`` and ``seeds[i]``. The result for each holds
    exactly ``round(duration_s * sample_rate)`` frames of new audio only: the
    context is not repeated.
    """

    context: Audio
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    sampling: Sampling = field(default_factory=Sampling)

    def __post_init__(self) -> None:
        if len(self.prompts) != len(self.seeds):
            raise ValueError(f"{len(self.prompts)} prompts for {len(self.seeds)} seeds")

    @property
    def duration_s(self) -> float:
        return self.sampling.duration_s

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


class Engine(Protocol):
    """What every engine has: the audio format it takes and returns, a description, and
    ``load()``, which loads its model once (later calls return at once)."""

    @property
    def sample_rate(self) -> int:
        """The rate of the audio the engine takes and returns; valid after ``load()``."""
        ...

    @property
    def channels(self) -> int:
        """The channel count of the audio it takes and returns; valid after ``load()``."""
        ...

    def info(self) -> EngineInfo: ...

    def load(self) -> None: ...


@dataclass(eq=False)
class Row:
    """One sibling to generate: the context it continues (as in ``Continuation``), its
    text, seed and sampling. ``fraction`` is how much of it is decoded; the batch keeps
    it up to date."""

    context: Audio
    prompt: str
    seed: int
    sampling: Sampling = field(default_factory=Sampling)
    fraction: float = 0.0

    @property
    def frames(self) -> int:
        return len(self.context)


class Batch(Protocol):
    """An engine's rows in flight (see the module docstring)."""

    joins_midway: bool  # rows may join between steps; else only while it is empty

    def __len__(self) -> int: ...

    def fits(self, row: Row) -> bool:
        """Whether ``row`` can join the rows in flight now."""
        ...

    def add(self, row: Row) -> None:
        """Take ``row`` in (it decodes from the next step); raising refuses that row only."""
        ...

    def step(self, on_step: Callable[[], None]) -> Iterable[tuple[Row, Audio]]:
        """Decode; gives the rows finished (they have left), each with its audio: exactly
        ``frames_for(row.sampling.duration_s, sample_rate)`` new frames. ``on_step`` runs
        after each decoding step, with every row's ``fraction`` up to date, and may
        ``remove`` rows or raise ``Cancelled`` to stop the whole batch. Raising anything
        else fails every row in flight (those not given yet).

        The caller iterates to the end: that is the step. A batch may give each row as
        soon as its audio is made, before the next one's (Sparrow's loop does), so that
        one row is published while the next is still turned into audio."""
        ...

    def remove(self, row: Row) -> None:
        """Stop decoding ``row`` (cancelled); it never comes out of ``step``."""
        ...


class GenerationEngine(Engine, Protocol):
    """Continues a context (``sample_rate``, ``channels``) with new audio of that format."""

    def batch(self) -> Batch:
        """An empty batch; loads the model (``EngineUnavailable`` if it cannot)."""
        ...

    def generate(self, request: Continuation, progress: Progress) -> list[Audio]: ...


def frames_for(duration_s: float, sample_rate: int) -> int:
    """The exact frame count of a requested duration."""
    return round(duration_s * sample_rate)


class StemEngine(Engine, Protocol):
    """Splits a mix into ``STEM_NAMES``.

    ``separate`` takes float32 ``(frames, channels)`` audio already at the engine's
    ``sample_rate`` and ``channels`` (the engine never reads files) and returns one
    float32 ``(frames, channels)`` array per stem name with exactly the mix's frame
    count. Progress rises monotonically and ends at 1.0.
    """

    def separate(self, audio: Audio, progress: Progress) -> dict[str, Audio]: ...


def check_mix(audio: Audio, channels: int) -> None:
    """``GenerationFailed`` unless ``audio`` is float32 ``(frames, channels)``."""
    if audio.ndim != 2 or audio.shape[1] != channels or audio.dtype != np.float32:
        raise GenerationFailed(
            f"The mix is {audio.dtype} with shape {audio.shape}; the stem engine takes "
            f"float32 (frames, {channels})."
        )


class LoadedModel(Protocol):
    """What every loaded model tells about the audio it takes and gives."""

    @property
    def sample_rate(self) -> int: ...

    @property
    def channels(self) -> int: ...


LoadedT = TypeVar("LoadedT", bound=LoadedModel)


class LoadsOnce(Generic[LoadedT]):
    """A model loaded once, on the first ``load()`` or use, under a lock (engines run in
    worker threads, and a preload may race the first job)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loaded: LoadedT | None = None

    @property
    def sample_rate(self) -> int:
        return self._ready().sample_rate

    @property
    def channels(self) -> int:
        return self._ready().channels

    def load(self) -> None:
        self._ready()

    def _ready(self) -> LoadedT:
        with self._lock:
            if self._loaded is None:
                self._loaded = self._load()
            return self._loaded

    def _load(self) -> LoadedT:
        raise NotImplementedError


def describe(exc: BaseException) -> str:
    """An exception as a short sentence for an error detail: its type and first line."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__
