"""Demucs 4 stem separation: a mix → drums, bass, other, vocals.

The model is a Demucs name (a single model or a bag of models, as ``htdemucs``):
with ``repo`` a local folder of ``<sig>.th`` files (and ``<name>.yaml`` bags), and
without it demucs' own download and cache, which is the production path. It loads
once, on the first ``load()`` (or first use of ``sample_rate``/``channels``/
``separate``), in float32, on CUDA when ``device`` is auto and one is there.

Separation is ``demucs.apply.apply_model`` as ``demucs.api.Separator`` calls it: the
mix normalised by the mean and standard deviation of its mono reference (undone
after), split into the model's segments with 25 % overlap, without the random time
shift (see ``SHIFTS``), so the same mix always gives the same stems.
The mix stays on the CPU; only each chunk visits the device, so a long track costs
host memory, not GPU memory. A model with more sources (``htdemucs_6s``) has its
extra ones (guitar, piano) folded into ``other``.

Progress and cancel. With ``split=True`` and no worker threads, apply_model submits
every chunk to a lazy ``DummyPoolExecutor`` and runs each when collecting its
result, calling our callback before and after it. An exception raised in that
callback leaves ``future.result()``; apply_model then shuts the pool down
(``except BaseException``: made for aborting from a callback) and re-raises it, so
a ``Cancelled`` raised by ``progress`` after a chunk stops the separation before
the next chunk starts and reaches the caller unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from demucs.apply import BagOfModels, apply_model
from demucs.pretrained import get_model

from sparrow.engines.base import (
    STEM_NAMES,
    Audio,
    EngineInfo,
    LoadsOnce,
    Progress,
    check_mix,
    describe,
)
from sparrow.engines.torch_device import resolve_device, torch_failures
from sparrow.errors import EngineUnavailable, GenerationFailed

OVERLAP = 0.25
# apply_model's shift trick averages over ``shifts`` random offsets of up to
# MAX_SHIFT_S. One shift averages nothing: it only makes two runs differ (it draws
# from Python's global RNG). None keeps a node's stems the same on every run.
SHIFTS = 0
MAX_SHIFT_S = 0.5


@dataclass(frozen=True)
class _Loaded:
    model: Any  # a demucs model or a BagOfModels
    sample_rate: int
    channels: int
    sources: tuple[str, ...]
    strides: tuple[int, ...]  # frames between chunk starts, per model in the bag


class DemucsEngine(LoadsOnce[_Loaded]):
    """A StemEngine over Demucs; ``device`` is auto, cpu, cuda or cuda:N."""

    def __init__(self, model: str = "htdemucs", repo: Path | None = None, device: str = "auto"):
        self.model = model
        self.repo = repo
        self.device = resolve_device(device)
        super().__init__()

    def info(self) -> EngineInfo:
        loaded = self._loaded is not None
        extra = {"repo": str(self.repo)} if self.repo is not None else {}
        dtype = "float32" if loaded else None
        return EngineInfo("demucs", self.model, self.device, loaded, dtype, extra)

    def _load(self) -> _Loaded:
        where = f"Demucs model {self.model!r}"
        if self.repo is not None:
            where += f" in {self.repo}"
            # demucs would print and sys.exit: say it here instead.
            if not self.repo.is_dir():
                raise EngineUnavailable(f"The {where} cannot load: the repo is not a folder.")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise EngineUnavailable(f"The {where} cannot load on {self.device}: no CUDA device.")
        try:
            model = get_model(self.model, repo=self.repo)
            model.eval()
            model.to(self.device)
        except SystemExit as exc:  # demucs' fatal(): it has printed the reason to stderr
            raise EngineUnavailable(f"The {where} could not be loaded (see the log).") from exc
        except Exception as exc:
            raise EngineUnavailable(f"The {where} could not be loaded: {describe(exc)}") from exc
        sources = tuple(str(s) for s in model.sources)
        missing = [name for name in STEM_NAMES if name not in sources]
        if missing:
            raise EngineUnavailable(
                f"The {where} separates {', '.join(sources)}; Sparrow needs "
                f"{', '.join(STEM_NAMES)}."
            )
        members: list[Any] = list(model.models) if isinstance(model, BagOfModels) else [model]
        sample_rate = int(model.samplerate)
        return _Loaded(
            model=model,
            sample_rate=sample_rate,
            channels=int(model.audio_channels),
            sources=sources,
            strides=tuple(
                max(1, int((1 - OVERLAP) * int(sample_rate * m.segment))) for m in members
            ),
        )

    def separate(self, audio: Audio, progress: Progress) -> dict[str, Audio]:
        m = self._ready()
        check_mix(audio, m.channels)
        frames = len(audio)
        if frames == 0:
            progress(1.0)
            return {name: np.zeros((0, m.channels), np.float32) for name in STEM_NAMES}
        chunks = _ChunkProgress(m, frames, progress)
        with (
            torch_failures(
                "Demucs failed while separating",
                out_of_memory="Demucs ran out of GPU memory while separating.",
            ),
            torch.inference_mode(),
        ):
            mix = torch.from_numpy(np.ascontiguousarray(audio.T))  # (channels, frames)
            ref = mix.mean(0)
            mean = ref.mean()
            std = (ref.std() if frames > 1 else torch.zeros(())) + 1e-8
            out = apply_model(
                m.model,
                ((mix - mean) / std)[None],
                shifts=SHIFTS,
                split=True,
                overlap=OVERLAP,
                device=self.device,
                num_workers=0,
                callback=chunks,
            )
            separated = (out[0] * std + mean).float().cpu().numpy()  # (sources, ch, frames)
        if not np.isfinite(separated).all():
            raise GenerationFailed("Demucs produced non-finite audio.")
        stems = {name: np.zeros((frames, m.channels), np.float32) for name in STEM_NAMES}
        for source, audio_ in zip(m.sources, separated, strict=True):
            stems[source if source in stems else "other"] += audio_.T
        if chunks.last < 1.0:
            progress(1.0)
        return stems


class _ChunkProgress:
    """apply_model's callback: reports the share of chunks done after each one.

    The shift trick separates ``frames + max_shift - offset`` frames for a random
    offset, so the chunk count is only bounded: the total is that bound, and the
    last chunk may land short of 1.0 (``separate`` then reports 1.0 itself).
    """

    def __init__(self, m: _Loaded, frames: int, progress: Progress) -> None:
        longest = frames + (int(MAX_SHIFT_S * m.sample_rate) if SHIFTS else 0)
        self.total = max(1, SHIFTS) * sum(math.ceil(longest / stride) for stride in m.strides)
        self.done = 0
        self.last = 0.0
        self.progress = progress

    def __call__(self, state: dict[str, Any]) -> None:
        if state.get("state") != "end":
            return
        self.done += 1
        self.last = max(self.last, min(1.0, self.done / self.total))
        self.progress(self.last)
