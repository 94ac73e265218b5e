"""MusicGen through transformers: audio-prompted continuation of a path's tail.

The model is a hub id or a ``save_pretrained`` folder; it loads once, on the first
``load()`` (or the first use of ``sample_rate``/``channels``/``generate``): on CUDA
in bfloat16 (float16 without bf16 support) with SDPA attention, Encodec in float32;
on CPU in float32. A model that cannot load is ``EngineUnavailable``; an error while
generating is ``GenerationFailed``; a ``Cancelled`` from progress passes untouched.

Siblings are one batch, one row each with its own text and seed (rather than
``num_return_sequences``, broken in transformers 5.23), always with a text (empty
allowed; texts of different lengths are padded and masked). The output
holds the re-decoded prompt, which is cut at the prompt's code boundary; the prompt
is first trimmed at its start to whole codes (640 samples at 32 kHz), so the new
audio starts exactly where the context ends. The delay pattern costs
``num_codebooks - 1`` extra steps, so a window asks for ``codes + num_codebooks - 1``
new tokens.

Seeds. transformers samples with the process-wide RNG, which would make a sibling's
audio depend on its place in the batch. So generation runs greedily and a logits
processor, placed after MusicGen's classifier-free guidance, samples each sibling's
rows (``num_codebooks`` rows each) with that sibling's own ``torch.Generator``, and
leaves only the sampled token finite. The same seed then gives the same codes alone
or as the third of four siblings; each sibling's audio is also decoded on its own.

Decoding loop. On CUDA the steps run in Sparrow's own loop
(``sparrow.engines.decoding``: static KV cache, sampling on the device, CUDA
graphs), once a self-check at load has found it gives ``generate``'s greedy
tokens on that device (``sparrow.engines.self_check``; otherwise ``generate`` is
used and ``info()`` says why); elsewhere, or with ``decoder="transformers"``, in
transformers' ``generate``. Both give the same tokens when decoding greedily; seeded sampling
differs between them (Sparrow's loop draws by inverse CDF from each sibling's
pre-drawn uniforms), so a seed reproduces its audio on the same loop and device.
Stereo checkpoints (``audio_channels`` 2: each channel coded by the mono Encodec,
the two channels' codebooks interleaved in the decoder) run on both loops; each
channel is encoded and decoded on its own, as transformers does.

Windows. MusicGen sees at most ``window`` codes, prompt included: the generation
config's ``max_length`` less the delay pattern (1503 → 1500 codes, 30 s). A longer
request is generated in windows, each conditioned on the tail of what came before
(the context, then the audio generated so far — so even with no context, later
windows continue the earlier ones). A window's prompt is that tail, capped at
``window - min(remaining, stride)`` codes with ``stride`` 60 % of the window (18 s of
30 s, audiocraft's default): a window adds all that remains if it fits beside the
prompt, and otherwise at least ``stride``. Within a node, each window's first
samples are joined to the previous window's audio with a 20 ms crossfade from the
previous audio into the re-decoded prompt (they differ slightly). Progress counts
decoding steps over all windows.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import (
    AutoProcessor,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    MusicgenForConditionalGeneration,
    MusicgenProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
)

from sparrow.engines import self_check
from sparrow.engines.base import (
    Audio,
    Batch,
    Continuation,
    EngineInfo,
    LoadsOnce,
    Progress,
    Row,
    frames_for,
)
from sparrow.engines.batching import decode_alone
from sparrow.engines.decoding import Decoding, MusicGenDecoder, prompt_codes
from sparrow.engines.decoding import Row as DecoderRow
from sparrow.engines.torch_device import (
    cpu_threads,
    cpu_threads_for,
    resolve_device,
    torch_failures,
)
from sparrow.errors import EngineUnavailable, GenerationFailed
from sparrow.models import Sampling

log = logging.getLogger(__name__)

STRIDE = 0.6  # share of a window that is new audio when more remains after it
JOIN_S = 0.02  # crossfade between windows of one node
# Encodec has no SDPA path; the text encoder and the decoder (where the time goes) do.
_SDPA = {"text_encoder": "sdpa", "decoder": "sdpa"}


@dataclass(frozen=True)
class Window:
    prompt: int  # codes of prompt
    new: int  # codes of new audio


def plan_windows(context: int, total: int, window: int) -> list[Window]:
    """The windows that generate ``total`` codes after ``context`` codes of prompt."""
    stride = max(1, round(window * STRIDE))
    plan: list[Window] = []
    available, remaining = context, total
    while remaining > 0:
        prompt = min(available, window - min(remaining, stride))
        new = min(remaining, window - prompt)
        plan.append(Window(prompt, new))
        available, remaining = available + new, remaining - new
    return plan


@dataclass(frozen=True)
class _Loaded:
    model: MusicgenForConditionalGeneration
    processor: MusicgenProcessor
    greedy: GenerationConfig  # the checkpoint's config with sampling left to _SiblingSampler
    sample_rate: int
    channels: int
    hop: int  # samples per code
    codebooks: int
    window: int  # codes per window, prompt included
    decoder: MusicGenDecoder | None  # Sparrow's loop, or None for transformers' generate
    cpu_threads: int | None  # torch's threads while generating; None: not on the CPU


DECODERS = ("auto", "sparrow", "transformers")


class MusicGenEngine(LoadsOnce[_Loaded]):
    """A GenerationEngine over MusicGen.

    ``device`` is auto, cpu, cuda or cuda:N; ``decoder`` picks the decoding loop:
    ``sparrow`` (``sparrow.engines.decoding``), ``transformers`` (its ``generate``),
    or ``auto``: Sparrow's on CUDA, transformers' elsewhere.
    """

    def __init__(
        self,
        model: str,
        device: str = "auto",
        decoder: str = "auto",
        *,
        check_loop: bool | None = None,
        threads: int = 0,
    ) -> None:
        """``check_loop``: compare Sparrow's loop with ``generate`` when the model loads
        (``sparrow.engines.self_check``); None: on CUDA, where no test has run it.
        ``threads``: torch's CPU threads while generating on the CPU; 0: chosen by the
        model's width (``cpu_threads_for``)."""
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}")
        self.model = model
        self.device = resolve_device(device)
        self.decoder = decoder
        if decoder == "auto":  # the loop that batches across requests, on every device
            self.decoder = "sparrow"
        self.check_loop = self.device.startswith("cuda") if check_loop is None else check_loop
        self.loop_check: str | None = None  # "passed", or why the loop is not used
        self.threads = threads
        super().__init__()

    @classmethod
    def from_model(
        cls,
        model: MusicgenForConditionalGeneration,
        processor: MusicgenProcessor,
        *,
        name: str,
        device: str = "auto",
        decoder: str = "auto",
    ) -> MusicGenEngine:
        """An engine over a model built in memory (benchmarks), placed as ``load()`` would."""
        engine = cls(name, device, decoder)
        engine._check_device()
        torch.nn.Module.to(model, device=engine.device, dtype=_dtype_for(engine.device))
        engine._loaded = engine._install(model, processor)
        return engine

    def info(self) -> EngineInfo:
        loaded = self._loaded
        dtype = str(loaded.model.decoder.dtype).removeprefix("torch.") if loaded else None
        loop = self.decoder if loaded is None or loaded.decoder else "transformers"
        extra: dict[str, Any] = {"decoder": loop}
        if self.loop_check is not None:
            extra["decoder_check"] = self.loop_check
        return EngineInfo("musicgen", self.model, self.device, loaded is not None, dtype, extra)

    def _load(self) -> _Loaded:
        where = f"MusicGen model {self.model!r}"
        path = Path(self.model).expanduser()
        # A path-like name must be a folder: never let it fall through to the hub.
        path_like = (
            path.is_absolute() or self.model.startswith((".", "~")) or self.model.count("/") > 1
        )
        if path_like and not path.is_dir():
            raise EngineUnavailable(f"The {where} is not a folder.")
        self._check_device()
        try:
            model = MusicgenForConditionalGeneration.from_pretrained(
                self.model, dtype=_dtype_for(self.device), attn_implementation=_SDPA
            )
            processor = AutoProcessor.from_pretrained(self.model)  # type: ignore[no-untyped-call]
            if not isinstance(processor, MusicgenProcessor):
                raise TypeError(f"its processor is a {type(processor).__name__}")
            torch.nn.Module.to(model, device=self.device)
            return self._install(model, processor)
        except Exception as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EngineUnavailable(f"The {where} could not be loaded: {reason[:300]}") from exc

    def _check_device(self) -> None:
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise EngineUnavailable(
                f"The MusicGen model {self.model!r} cannot load on {self.device}: no CUDA device."
            )

    def _install(
        self, model: MusicgenForConditionalGeneration, processor: MusicgenProcessor
    ) -> _Loaded:
        model.train(False)
        # Encodec stays in float32: a small share of the time, and the audio's precision.
        torch.nn.Module.float(model.audio_encoder)
        codec: Any = model.config.audio_encoder
        decoder: Any = model.config.decoder
        _run_rowwise(model.audio_encoder)
        greedy = copy.deepcopy(model.generation_config)
        # Sampling happens in _SiblingSampler. Installed as the model's own config too, since
        # generate() fills a passed config's unset fields from it (and would warn about top_k).
        greedy.do_sample, greedy.temperature, greedy.top_k, greedy.top_p = False, None, None, None
        model.generation_config = greedy
        codebooks = int(decoder.num_codebooks) // int(decoder.audio_channels)
        own_loop = None
        if self.decoder == "sparrow":
            # Positions: the BOS, then a whole window of codes and the delay pattern.
            own_loop = MusicGenDecoder(model, max_length=(greedy.max_length or 1503) + 1)
            if self.check_loop:
                problem = self_check.failure(model, processor, own_loop)
                self.loop_check = "passed" if problem is None else f"not used: {problem}"
                if problem is not None:
                    log.warning(
                        "Sparrow's decoding loop is not used on %s: %s", self.device, problem
                    )
                    own_loop = None
                elif (
                    beside := self_check.batch_difference(model, processor, own_loop)
                ) is not None:
                    self.loop_check = f"passed; a row beside others differs from alone ({beside})"
                    log.warning(
                        "On %s a row decoded beside others differs from the same row alone "
                        "(%s): a seed's audio depends on the batch it ran in",
                        self.device,
                        beside,
                    )
        return _Loaded(
            model=model,
            processor=processor,
            greedy=greedy,
            sample_rate=int(codec.sampling_rate),
            # Stereo checkpoints code each channel with a mono Encodec: the decoder knows.
            channels=int(decoder.audio_channels),
            hop=int(np.prod(codec.upsampling_ratios)),
            codebooks=codebooks,
            window=(greedy.max_length or 1503) - (codebooks - 1),
            decoder=own_loop,
            cpu_threads=(
                cpu_threads_for(self.threads, int(decoder.hidden_size))
                if self.device == "cpu"
                else None
            ),
        )

    def batch(self) -> Batch:
        m = self._ready()
        if m.decoder is not None:
            return _LoopBatch(m, m.decoder)
        return _GenerateBatch(m)

    def generate(self, request: Continuation, progress: Progress) -> list[Audio]:
        return decode_alone(self.batch(), request, progress)


@dataclass(eq=False)
class _Plan:
    """One row's work: its windows, and what it has made so far."""

    row: Row
    windows: list[Window]
    samples: int  # frames of new audio it asks for
    tail: Audio  # the context, then the audio made so far, whole codes only
    generator: torch.Generator
    made: list[Audio]
    steps: int  # decoding steps over all windows
    window: int = 0  # the window being decoded
    steps_before: int = 0  # the steps of the windows before it

    @classmethod
    def of(cls, m: _Loaded, row: Row) -> _Plan:
        context = row.context
        if context.ndim != 2 or context.shape[1] != m.channels:
            raise GenerationFailed(
                f"The context has shape {context.shape}; the model takes {m.channels} "
                "channel(s) as (frames, channels)."
            )
        samples = frames_for(row.sampling.duration_s, m.sample_rate)
        windows = plan_windows(len(context) // m.hop, math.ceil(samples / m.hop), m.window)
        whole = len(context) - len(context) % m.hop
        # Sparrow's loop draws its uniforms on the CPU, whatever the device.
        where = "cpu" if m.decoder else m.model.device
        return cls(
            row=row,
            windows=windows,
            samples=samples,
            tail=context[len(context) - whole :],
            generator=torch.Generator(where).manual_seed(row.seed),
            made=[],
            steps=sum(w.new + m.codebooks - 1 for w in windows),
        )

    @property
    def current(self) -> Window:
        return self.windows[self.window]

    def prompt_audio(self, m: _Loaded) -> Audio:
        return self.tail[len(self.tail) - self.current.prompt * m.hop :]

    def took(self, m: _Loaded, audio: Audio) -> bool:
        """Keep the new audio of the window just decoded (``audio``: its prompt re-decoded,
        then the new audio); returns whether windows remain."""
        w = self.current
        start = w.prompt * m.hop
        new = audio[start : start + w.new * m.hop]
        if self.made and start:
            _crossfade_into(self.made[-1], audio[:start], int(JOIN_S * m.sample_rate))
        self.made.append(new)
        self.tail = np.concatenate([self.tail, new])[-m.window * m.hop :]
        self.steps_before += w.new + m.codebooks - 1
        self.window += 1
        return self.window < len(self.windows)

    def audio(self, channels: int) -> Audio:
        if not self.made:
            return np.zeros((0, channels), np.float32)
        return np.concatenate(self.made)[: self.samples].astype(np.float32, copy=False)


def _failures() -> Any:
    return torch_failures(
        "MusicGen failed while generating",
        out_of_memory="MusicGen ran out of GPU memory; try fewer siblings.",
    )


class _LoopBatch:
    """Rows through Sparrow's loop: each joins at a step boundary, decodes its windows one
    after another in its slot, and leaves when its last window is decoded."""

    joins_midway = True

    def __init__(self, m: _Loaded, decoder: MusicGenDecoder) -> None:
        self.m = m
        self.decoder = decoder
        decoder.clear()  # one batch at a time: a new one starts empty
        self.plans: dict[int, _Plan] = {}  # by id of the decoder's Decoding
        self.empty: list[_Plan] = []  # rows that ask for no codes at all
        self.leaving: list[tuple[Decoding, _Plan]] = []  # windows just done, in a step
        # The last first window's prompt codes, by its context (the array itself) and
        # sampling: a request's siblings share them, so Encodec runs once for them all.
        self.shared: tuple[Audio, Sampling, torch.Tensor | None] | None = None

    def __len__(self) -> int:
        return len(self.plans) + len(self.empty)

    def fits(self, row: Row) -> bool:
        return True

    def add(self, row: Row) -> None:
        plan = _Plan.of(self.m, row)
        if not plan.windows:
            self.empty.append(plan)
            return
        with cpu_threads(self.m.cpu_threads), _failures():
            self._start(plan)

    def remove(self, row: Row) -> None:
        for key, plan in list(self.plans.items()):
            if plan.row is row:
                decoding = next(d for d in self.decoder.live if id(d) == key)
                self.decoder.remove(decoding)
                del self.plans[key]
        self.empty = [p for p in self.empty if p.row is not row]
        self.leaving = [(d, p) for d, p in self.leaving if p.row is not row]

    def step(self, on_step: Callable[[], None]) -> Iterator[tuple[Row, Audio]]:
        """One decoding step; each row it finishes is given as soon as its audio is
        decoded, before the next one's."""
        m = self.m
        empty, self.empty = self.empty, []
        for plan in empty:
            yield plan.row, plan.audio(m.channels)
        with cpu_threads(m.cpu_threads), _failures():
            finished = self.decoder.step()
            for d in [*self.decoder.live, *finished]:
                plan = self.plans[id(d)]
                plan.row.fraction = min(1.0, (plan.steps_before + d.steps_done) / plan.steps)
            self.leaving = [(d, self.plans.pop(id(d))) for d in finished]
            on_step()  # may remove rows, those just done included
            done, self.leaving = self.leaving, []
            for d, plan in done:
                if plan.took(m, self._audio(d)):
                    self._start(plan)  # its next window, in the same step boundary
                else:
                    yield plan.row, plan.audio(m.channels)

    def _start(self, plan: _Plan) -> None:
        """Start the plan's current window: its text and prompt codes into the loop."""
        m, w, row = self.m, plan.current, plan.row
        first = plan.window == 0
        shared = self.shared if first else None
        if shared is not None and shared[0] is row.context and shared[1] == row.sampling:
            inputs, codes = _processed(m, [plan], audio=False), shared[2]
        else:
            inputs = _processed(m, [plan])
            codes = None
            if "input_values" in inputs:
                values, mask = inputs["input_values"], inputs.get("padding_mask")
                codes = prompt_codes(m.model.audio_encoder, values, mask)[0]
            if first:
                self.shared = (row.context, row.sampling, codes)
        drawn = row.sampling
        decoding = self.decoder.add(
            DecoderRow(
                input_ids=inputs["input_ids"][0],
                prompt_codes=codes,
                max_new_tokens=w.new + m.codebooks - 1,
                guidance_scale=drawn.cfg_coef,
                generator=plan.generator,
                temperature=drawn.temperature,
                top_k=drawn.top_k,
                top_p=drawn.top_p,
            )
        )
        self.plans[id(decoding)] = plan

    def _audio(self, decoding: Decoding) -> Audio:
        """A finished window's codes as audio (samples, channels): each channel on its own."""
        codes, m = decoding.codes, self.m
        assert codes is not None
        codec: Any = m.model.audio_encoder
        with torch.inference_mode():
            audio = torch.cat(
                [
                    codec.decode(codes[None, None, c :: m.channels], [None]).audio_values
                    for c in range(m.channels)
                ],
                dim=1,
            )
        result: Audio = audio[0].float().cpu().numpy().T
        return result


class _GenerateBatch:
    """Rows through transformers' ``generate``: rows that wait together and fit one call
    (the same context length, duration and sampling settings; any texts and seeds) are
    decoded as one batch, from start to end."""

    joins_midway = False

    def __init__(self, m: _Loaded) -> None:
        self.m = m
        self.plans: list[_Plan] = []
        self.removed: set[int] = set()

    def __len__(self) -> int:
        return len(self.plans) - len(self.removed)

    def fits(self, row: Row) -> bool:
        if not self.plans:
            return True
        first = self.plans[0].row
        return row.frames == first.frames and row.sampling == first.sampling

    def add(self, row: Row) -> None:
        self.plans.append(_Plan.of(self.m, row))

    def remove(self, row: Row) -> None:
        self.removed.update(id(p) for p in self.plans if p.row is row)

    def step(self, on_step: Callable[[], None]) -> list[tuple[Row, Audio]]:
        m, plans = self.m, self.plans
        steps_done = 0

        def each_step() -> None:
            nonlocal steps_done
            steps_done += 1
            for plan in plans:
                plan.row.fraction = min(1.0, steps_done / plan.steps)
            on_step()

        try:
            with cpu_threads(m.cpu_threads), _failures():
                for _ in plans[0].windows:  # the same windows for every row: they fit
                    made = self._window(plans, each_step)
                    for plan, audio in zip(plans, made, strict=True):
                        plan.took(m, audio)
            return [(p.row, p.audio(m.channels)) for p in plans if id(p) not in self.removed]
        finally:
            self.plans, self.removed = [], set()

    def _window(self, plans: list[_Plan], on_step: Callable[[], None]) -> list[Audio]:
        """One generate() call for the rows' current window: each row's prompt + new audio,
        decoded alone."""
        m, sampling = self.m, plans[0].row.sampling
        new_codes = plans[0].current.new
        inputs = _processed(m, plans)
        config = copy.deepcopy(m.greedy)
        config.max_new_tokens = new_codes + m.codebooks - 1
        config.guidance_scale = sampling.cfg_coef
        generators = [p.generator for p in plans]
        sampler = _SiblingSampler(generators, m.codebooks * m.channels, sampling)
        result = m.model.generate(
            **inputs,
            generation_config=config,
            logits_processor=_SamplerLast([sampler]),
            stopping_criteria=StoppingCriteriaList([_StepHook(on_step)]),
        )
        return [a.T for a in result.float().cpu().numpy()]


def _processed(m: _Loaded, plans: list[_Plan], *, audio: bool = True) -> Any:
    """The processor's inputs for the plans' current window, on the model's device: each
    row's text, padded, and its audio prompt (none in a window without one, or without
    ``audio``)."""
    prompts = [p.prompt_audio(m) for p in plans]
    kwargs: dict[str, Any] = {"text": [p.row.prompt for p in plans], "padding": True}
    if audio and len(prompts[0]):
        kwargs["audio"] = [a[:, 0] if m.channels == 1 else a.T for a in prompts]
        kwargs["sampling_rate"] = m.sample_rate
    return m.processor(**kwargs, return_tensors="pt").to(m.model.device)


class _SiblingSampler(LogitsProcessor):
    """Temperature, top-k, top-p, then one draw per row from that sibling's generator.

    Returns scores that are -inf except at the drawn token, so greedy search picks it.
    """

    def __init__(
        self, generators: Sequence[torch.Generator], rows_per_sibling: int, drawn: Sampling
    ) -> None:
        if drawn.temperature <= 0:
            raise ValueError("temperature must be positive")
        self.generators = generators
        self.rows = rows_per_sibling
        self.temperature, self.top_k, self.top_p = drawn.temperature, drawn.top_k, drawn.top_p

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.shape[0] != len(self.generators) * self.rows:
            # Rows still doubled: classifier-free guidance has not run before this processor.
            raise RuntimeError(f"sampler got {scores.shape[0]} rows, expected guided rows")
        logits = scores.float() / self.temperature
        if 0 < self.top_k < logits.shape[-1]:
            kth = torch.topk(logits, self.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -math.inf)
        if 0 < self.top_p < 1:
            ordered, order = logits.sort(dim=-1, descending=True)
            probs = ordered.softmax(dim=-1)
            beyond = probs.cumsum(dim=-1) - probs > self.top_p  # keeps at least the best token
            logits = logits.scatter(-1, order, ordered.masked_fill(beyond, -math.inf))
        probs = logits.softmax(dim=-1)
        tokens = torch.cat(
            [
                torch.multinomial(probs[i * self.rows : (i + 1) * self.rows], 1, generator=g)
                for i, g in enumerate(self.generators)
            ]
        )
        chosen = torch.full_like(scores, -math.inf)
        return chosen.scatter_(-1, tokens, 0.0)  # type: ignore[return-value]


class _SamplerLast(LogitsProcessorList):
    """MusicGen.generate appends its classifier-free-guidance processor to the caller's
    list (transformers 5.23, step 8 of its generate); keep the sampler after it."""

    def append(self, processor: Any) -> None:
        self.insert(len(self) - 1, processor)


class _StepHook(StoppingCriteria):
    """Called once per decoding step: the only per-step hook MusicGen honours.

    It never stops generation (returning True breaks the delay-pattern reshape); a
    cancel is a ``Cancelled`` raised by the progress callback, passing through generate.
    """

    def __init__(self, on_step: Callable[[], None]) -> None:
        self.on_step = on_step

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        self.on_step()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]


def _run_rowwise(codec: Any) -> None:
    """Make the model's Encodec encode and decode one batch row at a time.

    Batched convolutions round differently from single-row ones (by ~1e-7), which
    would make a sibling's audio depend on the batch it was generated in. The codec
    is a small share of the time; the decoder's steps stay batched.
    """
    if getattr(codec, "_sparrow_rowwise", False):
        return  # already (one model behind two engines, in benchmarks)
    codec._sparrow_rowwise = True
    encode, decode = codec.encode, codec.decode

    def rowwise_encode(input_values: torch.Tensor, padding_mask: Any = None, **kw: Any) -> Any:
        rows: list[Any] = []
        for i in range(len(input_values)):
            if i and torch.equal(input_values[i], input_values[i - 1]):
                rows.append(rows[-1])  # siblings share the first window's prompt: encode it once
            else:
                rows.append(encode(input_values[i : i + 1], _row(padding_mask, i), **kw))
        first = rows[0]
        first.audio_codes = torch.cat([r.audio_codes for r in rows], dim=1)
        first.audio_scales = _cat_scales([r.audio_scales for r in rows])
        return first

    def rowwise_decode(audio_codes: torch.Tensor, audio_scales: Any, *args: Any, **kw: Any) -> Any:
        rows = [
            decode(audio_codes[:, i : i + 1], [_row(s, i) for s in audio_scales], *args, **kw)
            for i in range(audio_codes.shape[1])
        ]
        first = rows[0]
        first.audio_values = torch.cat([r.audio_values for r in rows])
        return first

    codec.encode, codec.decode = rowwise_encode, rowwise_decode


def _row(value: torch.Tensor | None, i: int) -> torch.Tensor | None:
    return None if value is None else value[i : i + 1]


def _cat_scales(rows: list[list[torch.Tensor | None]]) -> list[torch.Tensor | None]:
    # Encodec's per-chunk scales: None unless it normalises (MusicGen's does not).
    return [None if s[0] is None else torch.cat(s) for s in zip(*rows, strict=True)]


def _crossfade_into(previous: Audio, redecoded_prompt: Audio, length: int) -> None:
    """Fade the end of ``previous`` into the re-decoded prompt's end, in place."""
    n = min(length, len(previous), len(redecoded_prompt))
    if n:
        ramp = np.linspace(0.0, 1.0, n, dtype=np.float32)[:, None]
        previous[-n:] = previous[-n:] * (1 - ramp) + redecoded_prompt[-n:] * ramp


def _dtype_for(device: str) -> torch.dtype:
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
