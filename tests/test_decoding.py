"""Sparrow's MusicGen decoding loop against transformers' ``generate``, on the tiny model (CPU).

Greedy decoding must give exactly transformers' tokens: text only, audio-prompted,
a batch of siblings, with and without guidance, and past an attention bucket.
The tokens are compared where transformers hands them to Encodec.
"""

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
from transformers import AutoProcessor, MusicgenForConditionalGeneration, MusicgenProcessor

from sparrow.engines.decoding import (
    BUCKET,
    Draws,
    MusicGenDecoder,
    Row,
    best_first,
    prompt_codes,
)
from sparrow.engines.tiny import make_tiny_musicgen

SR = 32_000


class Tiny:
    def __init__(self, folder: Path) -> None:
        self.model = MusicgenForConditionalGeneration.from_pretrained(
            folder, attn_implementation={"text_encoder": "sdpa", "decoder": "sdpa"}
        )
        self.model.train(False)
        processor = AutoProcessor.from_pretrained(folder)  # type: ignore[no-untyped-call]
        assert isinstance(processor, MusicgenProcessor)
        self.processor = processor
        max_length = self.model.generation_config.max_length
        assert max_length is not None
        self.decoder = MusicGenDecoder(self.model, max_length=max_length + 1)
        self.seen: list[torch.Tensor] = []
        self.codec: Any = self.model.audio_encoder
        decode: Any = self.codec.decode

        def recording(codes: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            self.seen.append(codes[0].clone())  # (batch, codebooks, codes)
            return decode(codes, *args, **kwargs)

        self.codec.decode = recording

    def inputs(self, texts: list[str], audio: np.ndarray | None) -> Any:
        kwargs: dict[str, Any] = {"text": texts, "padding": True, "return_tensors": "pt"}
        if audio is not None:
            kwargs |= {"audio": [audio] * len(texts), "sampling_rate": SR}
        return self.processor(**kwargs)

    def reference(self, inputs: Any, new: int, guidance: float) -> torch.Tensor:
        self.seen.clear()
        self.model.generate(**inputs, do_sample=False, guidance_scale=guidance, max_new_tokens=new)
        return self.seen[0]

    def ours(
        self, inputs: Any, new: int, guidance: float, sampling: Draws | None = None
    ) -> torch.Tensor:
        prompt = None
        if "input_values" in inputs:
            prompt = prompt_codes(self.codec, inputs["input_values"], inputs.get("padding_mask"))
        return self.decoder.generate(
            inputs["input_ids"],
            inputs["attention_mask"],
            prompt,
            max_new_tokens=new,
            guidance_scale=guidance,
            sampling=sampling,
        )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    # An 8 s window (400 codes): room to cross an attention bucket of 256 positions.
    folder = make_tiny_musicgen(tmp_path_factory.mktemp("decode") / "musicgen", window_s=8.0)
    return Tiny(folder)


def clip(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * SR)) / SR
    return (0.3 * np.sin(2 * np.pi * 220 * t) + 0.1 * rng.standard_normal(len(t))).astype(
        np.float32
    )


@pytest.mark.parametrize(
    ("texts", "seconds", "new", "guidance"),
    [
        (["drums and bass"], 0.0, 40, 3.0),  # text only
        (["drums", "slow jazz piano with warm strings"], 0.0, 40, 3.0),  # padded texts
        (["lofi beat"], 1.0, 40, 3.0),  # audio-prompted
        (["rock", "rock", "rock"], 1.0, 40, 3.0),  # a batch of siblings
        ([""], 0.6, 30, 1.0),  # no guidance, empty text
        (["ambient"], 4.0, 100, 3.0),  # 200 prompt codes: past the first bucket
    ],
)
def test_greedy_tokens_equal_transformers(
    tiny: Tiny, texts: list[str], seconds: float, new: int, guidance: float
) -> None:
    inputs = tiny.inputs(texts, clip(seconds) if seconds else None)
    expected = tiny.reference(inputs, new, guidance)
    got = tiny.ours(inputs, new, guidance)
    assert got.shape == expected.shape
    assert torch.equal(got, expected)
    if seconds >= 4.0:
        assert 1 + got.shape[-1] + 3 > BUCKET  # the last steps read a second bucket


def test_seeded_sampling_is_reproducible_alone_or_in_a_batch(tiny: Tiny) -> None:
    inputs = tiny.inputs(["groove"], clip(1.0))
    batch_inputs = tiny.inputs(["groove"] * 3, clip(1.0))

    def sample(inputs: Any, *seeds: int, **params: Any) -> torch.Tensor:
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        return tiny.ours(inputs, 30, 3.0, Draws(generators, **params))

    alone = sample(inputs, 7)
    assert torch.equal(alone, sample(inputs, 7))
    batch = sample(batch_inputs, 6, 7, 8)
    assert torch.equal(batch[1:2], alone)
    assert not torch.equal(batch[0], batch[1]) and not torch.equal(batch[1], batch[2])
    # The prompt's codes come back unchanged; only the new ones are sampled.
    greedy = tiny.ours(inputs, 30, 3.0)
    assert torch.equal(alone[..., :50], greedy[..., :50])
    # Sampling parameters apply: top_k=1 is greedy.
    assert torch.equal(sample(inputs, 7, top_k=1), greedy)
    # A tiny top_p keeps only the best token too.
    assert torch.equal(sample(inputs, 7, top_p=1e-6), greedy)


def test_the_cpu_ranking_is_topk_and_sort_and_depends_only_on_its_row() -> None:
    generator = torch.Generator().manual_seed(3)
    # Distinct values: exactly topk's and sort's answers.
    logits = torch.randperm(8 * 4 * 2048, generator=generator).float().view(8, 4, 2048)
    for ranked, expected in (
        (best_first(logits, 256), logits.topk(256, dim=-1)),
        (best_first(logits, 2048), logits.sort(dim=-1, descending=True)),
    ):
        assert torch.equal(ranked[0], expected[0]) and torch.equal(ranked[1], expected[1])
        assert ranked[1].dtype == torch.long
    # Ties (few values): a row ranks the same alone as beside any other rows.
    tied = torch.randint(0, 40, (8, 4, 2048), generator=generator).float()
    for keep in (256, 2048):
        values, index = best_first(tied, keep)
        assert torch.equal(values, tied.topk(keep, dim=-1).values)
        assert torch.equal(tied.gather(-1, index), values)
        chosen = index.sort(dim=-1).values
        assert bool((chosen[..., 1:] != chosen[..., :-1]).all())  # no index twice
        for row in range(8):
            alone = best_first(tied[row : row + 1].clone(), keep)
            assert torch.equal(alone[1][0], index[row])


def test_a_step_callback_can_stop_the_loop(tiny: Tiny) -> None:
    inputs = tiny.inputs(["stop"], None)
    calls = 0

    class Stop(Exception):
        pass

    def on_step() -> None:
        nonlocal calls
        calls += 1
        if calls == 5:
            raise Stop

    with pytest.raises(Stop):
        tiny.decoder.generate(
            inputs["input_ids"],
            inputs["attention_mask"],
            None,
            max_new_tokens=40,
            guidance_scale=3.0,
            sampling=None,
            on_step=on_step,
        )
    assert calls == 5
    # The loop is usable again at once, with the same buffers.
    expected = tiny.reference(inputs, 40, 3.0)
    assert torch.equal(tiny.ours(inputs, 40, 3.0), expected)


@pytest.fixture(scope="module")
def stereo(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    """A stereo tiny model, as facebook/musicgen-stereo-*: 8 codebooks, the channels'
    interleaved, over a mono Encodec."""
    folder = tmp_path_factory.mktemp("stereo") / "musicgen"
    return Tiny(make_tiny_musicgen(folder, window_s=8.0, channels=2))


def interleaved(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """(batch, 4, codes) per channel → (batch, 8, codes): L0, R0, L1, R1, …"""
    return torch.stack([left, right], dim=2).flatten(1, 2)


@pytest.mark.parametrize(
    ("texts", "seconds", "new", "guidance"),
    [
        (["drums and bass"], 0.0, 40, 3.0),
        (["rock", "slow jazz"], 1.0, 40, 3.0),
        ([""], 0.6, 30, 1.0),
    ],
)
def test_stereo_greedy_tokens_equal_transformers(
    stereo: Tiny, texts: list[str], seconds: float, new: int, guidance: float
) -> None:
    audio = np.stack([clip(seconds, 0), clip(seconds, 1)]) if seconds else None  # (2, samples)
    inputs = stereo.inputs(texts, audio)
    stereo.seen.clear()
    stereo.model.generate(**inputs, do_sample=False, guidance_scale=guidance, max_new_tokens=new)
    left, right = stereo.seen  # transformers decodes each channel on its own
    expected = interleaved(left, right)
    if audio is not None:
        assert inputs["input_values"].shape[1] == 2
    got = stereo.ours(inputs, new, guidance)
    assert got.shape == expected.shape == (len(texts), 8, expected.shape[-1])
    assert torch.equal(got, expected)


def a_row(tiny: Tiny, text: str, seconds: float, new: int, seed: int | None, **params: Any) -> Row:
    """One row: a text, a prompt of ``seconds`` of audio, ``new`` tokens, greedy (None) or
    sampled from ``seed``."""
    inputs = tiny.inputs([text], clip(seconds, seed or 0) if seconds else None)
    prompt = None
    if "input_values" in inputs:
        prompt = prompt_codes(tiny.codec, inputs["input_values"], inputs.get("padding_mask"))[0]
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return Row(inputs["input_ids"][0], prompt, new, generator=generator, **params)


def alone(tiny: Tiny, row: Row) -> torch.Tensor:
    decoding = tiny.decoder.add(row)
    while tiny.decoder.live:
        tiny.decoder.step()
    assert decoding.codes is not None
    return decoding.codes


def rows_for(tiny: Tiny) -> list[Row]:
    """Rows that differ in every way a row can: text, prompt, length, guidance, sampling."""
    return [
        a_row(tiny, "drums", 1.0, 40, 11),
        a_row(tiny, "a slow ambient drone with strings and a choir", 0.0, 25, 12, top_k=50),
        a_row(tiny, "", 2.0, 60, None),  # greedy
        a_row(tiny, "lofi", 0.5, 35, 13, temperature=0.7, top_p=0.9, guidance_scale=1.0),
        a_row(tiny, "rock", 4.0, 90, 14),  # 200 prompt codes: past the first bucket
    ]


def test_rows_joining_mid_batch_decode_as_they_would_alone(tiny: Tiny) -> None:
    """Rows join at step boundaries, a cancelled one leaves, finished ones leave at once:
    every row's codes are the ones it gets alone, and the loop's buffers grow as needed."""
    expected = [alone(tiny, row) for row in rows_for(tiny)]
    rows = rows_for(tiny)  # fresh generators: the same draws again
    decoder = tiny.decoder
    first = decoder.add(rows[0])
    for _ in range(5):
        decoder.step()
    second, third = decoder.add(rows[1]), decoder.add(rows[2])
    dropped = decoder.add(a_row(tiny, "dropped", 1.0, 50, 99))
    finished: list[Any] = []
    for _ in range(3):
        finished += decoder.step()
    decoder.remove(dropped)  # a cancel: the others carry on
    fourth = decoder.add(rows[3])
    fifth = decoder.add(rows[4])
    assert len(decoder.live) == 5
    while decoder.live:
        done = decoder.step()
        assert all(d.done and d not in decoder.live for d in done)
        finished += done
    assert {id(d) for d in finished} == {id(d) for d in (first, second, third, fourth, fifth)}
    assert not dropped.done
    for got, want in zip((first, second, third, fourth, fifth), expected, strict=True):
        assert got.codes is not None and torch.equal(got.codes, want)
    # A row that finished early left its slot at once: the second row (25 tokens) was
    # done before the first (40, started 5 steps earlier... and 8 steps before it).
    assert finished.index(second) < finished.index(first)


def test_greedy_rows_beside_others_keep_transformers_tokens(tiny: Tiny) -> None:
    inputs = tiny.inputs(["lofi beat"], clip(1.0))
    expected = tiny.reference(inputs, 40, 3.0)
    decoder = tiny.decoder
    busy = decoder.add(a_row(tiny, "noise", 2.0, 80, 5))
    for _ in range(7):
        decoder.step()
    row = a_row(tiny, "lofi beat", 0.0, 40, None)
    prompt = prompt_codes(tiny.codec, inputs["input_values"], inputs.get("padding_mask"))[0]
    greedy = decoder.add(Row(row.input_ids, prompt, 40))
    while not greedy.done:
        decoder.step()
    decoder.remove(busy)
    assert greedy.codes is not None and torch.equal(greedy.codes, expected[0])
