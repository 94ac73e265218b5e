"""A short check, when a model loads, that Sparrow's decoding loop gives transformers'
tokens on this very device.

Sparrow's loop (static KV cache, sampling on the device, CUDA graphs) is exact in
greedy parity on a CPU, where the tests run; a GPU brings its own kernels, bfloat16
and graph capture, which no test here can run. So before the loop serves a job, the
engine decodes a few dozen greedy steps both ways — text only, then prompted by a
second of audio, with classifier-free guidance — and compares the codes
transformers hands to Encodec with the loop's. Any difference, or any error, and
the engine decodes with transformers' ``generate`` instead, logging why; the
reason is part of the engine's info (``/api/gpu``).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from sparrow.engines.decoding import MusicGenDecoder, Row, prompt_codes

log = logging.getLogger(__name__)

STEPS = 32
PROMPT_S = 1.0
TEXT = "self check"


def failure(model: Any, processor: Any, decoder: MusicGenDecoder) -> str | None:
    """Why Sparrow's loop cannot serve this model here (one sentence), or None if it gives
    transformers' greedy tokens."""
    try:
        for prompted in (False, True):
            inputs = _inputs(model, processor, prompted)
            expected = _reference(model, inputs)
            got = _ours(model, decoder, inputs)
            if got.shape != expected.shape or not torch.equal(got.cpu(), expected.cpu()):
                differ = _first_difference(got.cpu(), expected.cpu())
                kind = "prompted by audio" if prompted else "from text"
                return f"its greedy tokens differ from transformers' {kind} ({differ})"
    except Exception as exc:  # any failure of the loop here is a reason not to use it
        log.exception("the decoding loop's self-check failed with an error")
        return f"it failed on this device ({type(exc).__name__}: {str(exc)[:160]})"
    return None


def batch_difference(model: Any, processor: Any, decoder: MusicGenDecoder) -> str | None:
    """Whether a row decodes the same beside other rows as alone on this device: None if
    it does, else where it first differs. The device's kernels may round a batch of rows
    differently from one (a GPU's may); the loop still serves then, and the engine says so."""
    inputs = _inputs(model, processor, prompted=True)
    alone = _ours(model, decoder, inputs)
    values, mask = inputs["input_values"], inputs.get("padding_mask")
    prompt = prompt_codes(model.audio_encoder, values, mask)[0]
    row = Row(inputs["input_ids"][0], prompt, STEPS)
    other = Row(inputs["input_ids"][0][:1], None, STEPS + 8)  # another text, no prompt
    try:
        first = decoder.add(other)
        for _ in range(5):
            decoder.step()
        checked = decoder.add(row)
        while not checked.done:
            decoder.step()
        decoder.remove(first)
    finally:
        decoder.clear()
    assert checked.codes is not None
    if torch.equal(checked.codes.cpu(), alone[0].cpu()):
        return None
    return _first_difference(checked.codes[None].cpu(), alone.cpu())


def _inputs(model: Any, processor: Any, prompted: bool) -> Any:
    kwargs: dict[str, Any] = {"text": [TEXT], "padding": True, "return_tensors": "pt"}
    if prompted:
        rate = int(model.config.audio_encoder.sampling_rate)
        channels = int(model.config.decoder.audio_channels)
        t = np.arange(int(PROMPT_S * rate)) / rate
        tone = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
        kwargs["audio"] = [tone if channels == 1 else np.stack([tone] * channels)]
        kwargs["sampling_rate"] = rate
    return processor(**kwargs).to(model.device)


def _reference(model: Any, inputs: Any) -> torch.Tensor:
    """The codes transformers' generate hands to Encodec (each channel's, interleaved)."""
    codec = model.audio_encoder
    decode = codec.decode
    seen: list[torch.Tensor] = []

    def recording(codes: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        seen.append(codes[0].clone())
        return decode(codes, *args, **kwargs)

    codec.decode = recording
    try:
        with torch.inference_mode():
            model.generate(**inputs, do_sample=False, guidance_scale=3.0, max_new_tokens=STEPS)
    finally:
        codec.decode = decode
    if len(seen) == 1:
        return seen[0]
    return torch.stack(seen, dim=2).flatten(1, 2)  # stereo: left, right, left, …


def _ours(model: Any, decoder: MusicGenDecoder, inputs: Any) -> torch.Tensor:
    prompt = None
    if "input_values" in inputs:
        values, mask = inputs["input_values"], inputs.get("padding_mask")
        prompt = prompt_codes(model.audio_encoder, values, mask)
    return decoder.generate(
        inputs["input_ids"],
        inputs["attention_mask"],
        prompt,
        max_new_tokens=STEPS,
        guidance_scale=3.0,
        sampling=None,
    )


def _first_difference(got: torch.Tensor, expected: torch.Tensor) -> str:
    if got.shape != expected.shape:
        return f"shape {tuple(got.shape)} instead of {tuple(expected.shape)}"
    where = (got != expected).nonzero()
    codebook, step = int(where[0][1]), int(where[0][2])
    return f"first at codebook {codebook}, code {step}, of {expected.shape[-1]}"
