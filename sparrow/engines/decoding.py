"""Sparrow's own MusicGen decoding loop: a static KV cache, sampling on the device, CUDA graphs.

transformers' ``generate`` runs every step eagerly with a cache that grows by
concatenation, so at batch 1 on a GPU a step costs Python and kernel launches,
not memory bandwidth. This loop runs the same modules with the same weights
(``MusicgenForConditionalGeneration``: text encoder, decoder layers, LM heads)
but keeps every buffer at a fixed address:

- the self-attention keys/values live in a cache allocated once for the whole
  window (``max_length`` positions) and are written in place at the step's
  position; attention reads only a prefix of it, rounded up to ``BUCKET``
  positions, so the cost grows with the audio made so far, not the window;
- the cross-attention keys/values of the text are computed once per call, the
  text padded to a power of two (masked), so that one shape serves many prompts;
- classifier-free guidance runs as one batch (conditional rows, then the
  unconditional ones with a zero text, as transformers does);
- the codebook delay pattern comes from transformers' own
  ``build_delay_pattern_mask`` and is applied on the device at every step;
- temperature, top-k and top-p run on the device with per-row parameters held
  in tensors, and each sibling draws from uniforms made beforehand from its own
  seeded generator (inverse-CDF sampling), so a step needs no host sync and a
  seed gives the same draws whatever the batch;
- on CUDA one decoding step (sample, apply the pattern, run the decoder for the
  new token) is captured as a CUDA graph per (batch, text length, attention
  bucket) and replayed; elsewhere the same step function runs eagerly.

``generate`` returns the codes transformers would hand to Encodec: for each
codebook the prompt's codes, then the new ones. With ``sampling=None`` it
decodes greedily, token for token what ``generate(do_sample=False)`` gives.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn import functional as F

log = logging.getLogger(__name__)

BUCKET = 256  # attention reads the cache in multiples of this many positions
_TEXT_MIN = 16  # text lengths are padded to a power of two at least this long


@dataclass(frozen=True)
class Draws:
    """How tokens are drawn: the siblings' shared settings, and one generator per sibling."""

    generators: Sequence[torch.Generator]  # CPU generators, one per batch row
    temperature: float = 1.0
    top_k: int = 250  # 0: off
    top_p: float = 0.0  # 0: off


@dataclass(eq=False)
class _State:
    """Every buffer one (batch, guidance, text length) shape needs, at fixed addresses."""

    rows: int  # batch rows through the decoder (2 × batch with guidance)
    seq: torch.Tensor  # (batch·K, max_length) tokens, delay pattern applied
    pattern: torch.Tensor  # (batch·K, max_length) forced tokens, -1 where a token is sampled
    self_k: list[torch.Tensor]  # per layer (rows, heads, max_length, head_dim)
    self_v: list[torch.Tensor]
    cross_k: list[torch.Tensor]  # per layer (rows, heads, text, head_dim)
    cross_v: list[torch.Tensor]
    cross_mask: torch.Tensor  # (rows, 1, 1, text) additive
    scores: torch.Tensor  # (batch·K, vocab) float32: the guided logits for the next token
    pos: torch.Tensor  # () long: the position the next token goes to
    guidance: torch.Tensor  # () float32
    temperature: torch.Tensor  # (batch·K, 1) float32
    top_k: torch.Tensor  # (batch·K, 1) long: tokens kept (vocab when off)
    top_p: torch.Tensor  # (batch·K, 1) float32 (1 when off)
    uniforms: torch.Tensor  # (max_length, batch·K) float32: each row's draw at each position
    graphs: dict[tuple[int, bool], Any] = field(default_factory=dict)


class MusicGenDecoder:
    """Decodes with a ``MusicgenForConditionalGeneration``'s modules; see the module docstring."""

    def __init__(self, model: Any, *, max_length: int, graphs: bool | None = None) -> None:
        """``max_length``: positions of the longest call (prompt, BOS and delay included)."""
        self.model = model
        self.lm = model.decoder  # MusicgenForCausalLM: the LM heads
        self.core = model.decoder.model.decoder  # MusicgenDecoder: embeddings and layers
        config = model.decoder.config
        self.codebooks = int(config.num_codebooks)  # rows per sibling: both channels' in stereo
        self.channels = int(config.audio_channels)
        # Stereo interleaves the channels' codebooks (L0, R0, L1, R1, …) and delays each
        # pair by its codebook's index: the delay pattern spans codebooks // channels.
        self.delays = self.codebooks // self.channels
        self.vocab = int(config.vocab_size)
        self.heads = int(config.num_attention_heads)
        self.head_dim = int(config.hidden_size) // self.heads
        self.pad = int(model.generation_config.pad_token_id)
        self.bos = int(model.generation_config.decoder_start_token_id)
        self.max_length = max_length
        self.device = self.core.layer_norm.weight.device
        self.dtype = self.core.layer_norm.weight.dtype
        self.use_graphs = self.device.type == "cuda" if graphs is None else graphs
        self._state: _State | None = None
        self._state_key: tuple[int, int, int] | None = None
        self._pool: Any = None

    # -- the call ----------------------------------------------------------------------

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        prompt_codes: torch.Tensor | None,
        *,
        max_new_tokens: int,
        guidance_scale: float,
        sampling: Draws | None,
        on_step: Callable[[], None] = lambda: None,
    ) -> torch.Tensor:
        """Codes (batch, codebooks, prompt + max_new_tokens - (delays - 1)).

        ``input_ids``/``attention_mask``: the tokenized text, one row per sibling;
        ``prompt_codes``: (batch, codebooks, prompt) audio codes (stereo: the channels'
        codebooks interleaved, as transformers lays them out), or None.
        ``on_step`` runs after each step and may raise to stop.
        """
        batch = input_ids.shape[0]
        prompt = 0 if prompt_codes is None else prompt_codes.shape[-1]
        length = 1 + prompt + max_new_tokens
        if length > self.max_length:
            raise ValueError(f"{length} positions do not fit the cache of {self.max_length}")
        encoder_states, text_mask = self._encode_text(input_ids, attention_mask)
        guided = guidance_scale > 1
        state = self._state_for(batch, guided, encoder_states.shape[1])
        prefix = self._prepare(state, batch, prompt_codes, length)
        self._fill_cross(state, encoder_states, text_mask, guided)
        self._set_sampling(state, batch, sampling, guidance_scale, prefix, length)
        # Prefill: the BOS and the prompt in one pass; its last logits give the first token.
        state.scores.copy_(self._forward(state, state.seq[:, :prefix], 0, prefix))
        state.pos.fill_(prefix)
        greedy = sampling is None
        in_flight: list[Any] = []
        for pos in range(prefix, length):
            if pos == length - 1:
                self._choose(state, greedy)  # the last token needs no forward pass
            else:
                self._run_step(state, pos, greedy)
            if self.use_graphs:
                # At most two steps queued on the GPU: progress and cancel stay within a
                # step of the truth while the GPU never waits for the host.
                in_flight.append(torch.cuda.Event())  # type: ignore[no-untyped-call]
                in_flight[-1].record()
                if len(in_flight) > 2:
                    in_flight.pop(0).synchronize()
            on_step()
        return self._codes(state, batch, prompt + max_new_tokens - (self.delays - 1))

    # -- set-up, per call ------------------------------------------------------------------

    def _encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.model
        states = model.text_encoder(
            input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device)
        ).last_hidden_state
        if (
            model.text_encoder.config.hidden_size != model.decoder.config.hidden_size
            and model.decoder.config.cross_attention_hidden_size is None
        ):
            states = model.enc_to_dec_proj(states)
        mask = attention_mask.to(self.device)
        return states * mask[..., None].to(states.dtype), mask

    def _state_for(self, batch: int, guided: bool, text: int) -> _State:
        """The buffers for this shape: kept across calls (and so are their CUDA graphs)."""
        text = max(_TEXT_MIN, 1 << (text - 1).bit_length())
        key = (batch, int(guided), text)
        if self._state is not None and self._state_key == key:
            return self._state
        self._state = None  # one shape at a time: free the old buffers first
        rows, seqs = batch * (2 if guided else 1), batch * self.codebooks
        layers = len(self.core.layers)
        d, f = self.device, self.dtype

        def cache(positions: int) -> list[torch.Tensor]:
            shape = (rows, self.heads, positions, self.head_dim)
            return [torch.zeros(shape, device=d, dtype=f) for _ in range(layers)]

        self._state = _State(
            rows=rows,
            seq=torch.full((seqs, self.max_length), self.pad, device=d, dtype=torch.long),
            pattern=torch.full((seqs, self.max_length), self.pad, device=d, dtype=torch.long),
            self_k=cache(self.max_length),
            self_v=cache(self.max_length),
            cross_k=cache(text),
            cross_v=cache(text),
            cross_mask=torch.zeros((rows, 1, 1, text), device=d, dtype=f),
            scores=torch.zeros((seqs, self.vocab), device=d, dtype=torch.float32),
            pos=torch.zeros((), device=d, dtype=torch.long),
            guidance=torch.ones((), device=d, dtype=torch.float32),
            temperature=torch.ones((seqs, 1), device=d, dtype=torch.float32),
            top_k=torch.full((seqs, 1), self.vocab, device=d, dtype=torch.long),
            top_p=torch.ones((seqs, 1), device=d, dtype=torch.float32),
            uniforms=torch.zeros((self.max_length, seqs), device=d, dtype=torch.float32),
        )
        self._state_key = key
        return self._state

    def _prepare(
        self, state: _State, batch: int, prompt_codes: torch.Tensor | None, length: int
    ) -> int:
        """Lay out BOS + prompt with the delay pattern; returns the prefix length to prefill."""
        start = torch.full((batch * self.codebooks, 1), self.bos, dtype=torch.long)
        ids = start
        if prompt_codes is not None and prompt_codes.shape[-1]:
            codes = prompt_codes.reshape(batch * self.codebooks, -1).to("cpu", torch.long)
            ids = torch.cat([start, codes], dim=-1)
        prefix_ids, pattern = self.lm.build_delay_pattern_mask(ids, self.pad, max_length=length)
        state.pattern.fill_(self.pad)
        state.pattern[:, :length].copy_(pattern)
        prefix = int(prefix_ids.shape[-1])
        state.seq.fill_(self.pad)
        state.seq[:, :prefix].copy_(
            torch.where(pattern[:, :prefix] == -1, prefix_ids, pattern[:, :prefix])
        )
        return prefix

    def _fill_cross(
        self, state: _State, encoder_states: torch.Tensor, text_mask: torch.Tensor, guided: bool
    ) -> None:
        if guided:  # the unconditional half: a zero text, wholly masked
            encoder_states = torch.cat([encoder_states, torch.zeros_like(encoder_states)])
            text_mask = torch.cat([text_mask, torch.zeros_like(text_mask)])
        states = encoder_states.to(self.dtype)
        tokens = states.shape[1]
        for layer, k, v in zip(self.core.layers, state.cross_k, state.cross_v, strict=True):
            attn = layer.encoder_attn
            k.zero_()
            v.zero_()
            k[:, :, :tokens].copy_(self._heads_of(attn.k_proj(states)))
            v[:, :, :tokens].copy_(self._heads_of(attn.v_proj(states)))
        allowed = torch.zeros(
            state.cross_mask.shape[0], state.cross_mask.shape[-1], dtype=torch.bool
        )
        allowed[:, :tokens] = text_mask.to("cpu", torch.bool)
        blocked = torch.finfo(self.dtype).min
        state.cross_mask.copy_(torch.where(allowed, 0.0, blocked)[:, None, None, :].to(self.dtype))

    def _set_sampling(
        self,
        state: _State,
        batch: int,
        sampling: Draws | None,
        guidance_scale: float,
        prefix: int,
        length: int,
    ) -> None:
        state.guidance.fill_(guidance_scale)
        if sampling is None:
            return
        if not sampling.temperature > 0:
            raise ValueError("temperature must be positive")
        if len(sampling.generators) != batch:
            raise ValueError(f"{len(sampling.generators)} generators for a batch of {batch}")
        k = sampling.top_k if 0 < sampling.top_k < self.vocab else self.vocab
        p = sampling.top_p if 0 < sampling.top_p < 1 else 1.0
        state.temperature.fill_(sampling.temperature)
        state.top_k.fill_(k)
        state.top_p.fill_(p)
        # Each sibling's draws, made on the CPU from its own generator, in step order:
        # the same seed gives the same draws alone or in any batch, on any device.
        draws = torch.stack(
            [
                torch.rand((length - prefix, self.codebooks), generator=g)
                for g in sampling.generators
            ],
            dim=1,
        ).reshape(length - prefix, batch * self.codebooks)
        state.uniforms.zero_()
        state.uniforms[prefix:length].copy_(draws)

    # -- one step ----------------------------------------------------------------------

    def _run_step(self, state: _State, pos: int, greedy: bool) -> None:
        """Choose the token at ``pos`` and compute the logits for ``pos + 1``."""
        span = min(self.max_length, BUCKET * math.ceil((pos + 1) / BUCKET))
        if not self.use_graphs:
            self._step(state, span, greedy)
            return
        graph = state.graphs.get((span, greedy))
        if graph is None:
            try:
                graph = state.graphs[(span, greedy)] = self._capture(state, span, greedy)
            except RuntimeError:
                # A capture that fails changed nothing (the state is restored before it):
                # the same step runs eagerly from now on — slower, with the same result.
                log.exception("CUDA graph capture failed; decoding continues without graphs")
                self.use_graphs = False
                self._step(state, span, greedy)
                return
        graph.replay()

    def _step(self, state: _State, span: int, greedy: bool) -> None:
        """The captured work: no host sync, no new shapes; ``state.pos`` advances by one."""
        token = self._choose(state, greedy)
        batch = state.seq.shape[0] // self.codebooks
        ids = token.view(batch * self.codebooks, 1)
        state.scores.copy_(self._forward(state, ids, state.pos, span))
        state.pos.add_(1)

    def _choose(self, state: _State, greedy: bool) -> torch.Tensor:
        """The token at ``state.pos`` for every (sibling, codebook) row, written into ``seq``."""
        scores = state.scores
        token = scores.argmax(dim=-1) if greedy else self._sample(state, scores)
        forced = state.pattern.index_select(1, state.pos.view(1)).squeeze(1)
        token = torch.where(forced == -1, token, forced)
        state.seq.index_copy_(1, state.pos.view(1), token[:, None])
        return token

    def _sample(self, state: _State, scores: torch.Tensor) -> torch.Tensor:
        logits = scores / state.temperature
        ordered, order = logits.sort(dim=-1, descending=True)
        rank = torch.arange(self.vocab, device=logits.device)
        ordered = ordered.masked_fill(rank >= state.top_k, -math.inf)
        probs = ordered.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability of the better tokens
        probs = probs.masked_fill(before > state.top_p, 0.0)  # keeps at least the best
        cdf = probs.cumsum(dim=-1)
        draw = state.uniforms.index_select(0, state.pos.view(1)).view(-1, 1) * cdf[:, -1:]
        index = torch.searchsorted(cdf, draw).clamp_(max=self.vocab - 1)
        return order.gather(-1, index).squeeze(-1)

    def _capture(self, state: _State, span: int, greedy: bool) -> Any:
        """A CUDA graph of ``_step`` at this bucket, captured without changing the state."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        saved_pos, saved_scores = state.pos.clone(), state.scores.clone()
        stream = torch.cuda.Stream(device=self.device)  # type: ignore[no-untyped-call]
        stream.wait_stream(torch.cuda.current_stream(self.device))
        try:
            with torch.cuda.stream(stream):  # warm-up: what it writes is rewritten by the replay
                self._step(state, span, greedy)
        finally:
            torch.cuda.current_stream(self.device).wait_stream(stream)
            state.pos.copy_(saved_pos)
            state.scores.copy_(saved_scores)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._step(state, span, greedy)
        return graph

    # -- the decoder over the static cache --------------------------------------------------

    def _forward(
        self, state: _State, ids: torch.Tensor, start: int | torch.Tensor, span: int
    ) -> torch.Tensor:
        """Guided float32 logits of the last position of ``ids`` ((batch·K, n) tokens from
        position ``start``), writing their keys/values into the cache; attention reads
        the cache's first ``span`` positions."""
        n = ids.shape[-1]
        batch = ids.shape[0] // self.codebooks
        grouped = ids.reshape(batch, self.codebooks, n)
        if state.rows != batch:  # guidance: the same tokens for the unconditional rows
            grouped = grouped.repeat(2, 1, 1)
        core = self.core
        x = sum(core.embed_tokens[k](grouped[:, k]) for k in range(self.codebooks))
        positions = torch.arange(n, device=self.device) + start
        x = x + core.embed_positions.weights.index_select(0, positions).to(x.dtype)
        keys = torch.arange(span, device=self.device)
        causal = keys[None, :] <= positions[:, None]  # (n, span)
        for i, layer in enumerate(core.layers):
            h = layer.self_attn_layer_norm(x)
            attn = layer.self_attn
            q = self._heads_of(attn.q_proj(h))
            state.self_k[i].index_copy_(2, positions, self._heads_of(attn.k_proj(h)))
            state.self_v[i].index_copy_(2, positions, self._heads_of(attn.v_proj(h)))
            out = F.scaled_dot_product_attention(
                q,
                state.self_k[i][:, :, :span],
                state.self_v[i][:, :, :span],
                attn_mask=causal,
                scale=attn.scaling,
            )
            x = x + attn.out_proj(self._merge(out))
            h = layer.encoder_attn_layer_norm(x)
            cross = layer.encoder_attn
            out = F.scaled_dot_product_attention(
                self._heads_of(cross.q_proj(h)),
                state.cross_k[i],
                state.cross_v[i],
                attn_mask=state.cross_mask,
                scale=cross.scaling,
            )
            x = x + cross.out_proj(self._merge(out))
            h = layer.final_layer_norm(x)
            x = x + layer.fc2(layer.activation_fn(layer.fc1(h)))
        last = core.layer_norm(x[:, -1])
        logits = torch.stack([head(last) for head in self.lm.lm_heads], dim=1).float()
        logits = logits.reshape(state.rows * self.codebooks, self.vocab)
        if state.rows == batch:
            return logits
        cond, uncond = torch.split(logits, batch * self.codebooks)
        guided: torch.Tensor = uncond + (cond - uncond) * state.guidance
        return guided

    def _heads_of(self, x: torch.Tensor) -> torch.Tensor:
        """(rows, n, hidden) → (rows, heads, n, head_dim)."""
        return x.view(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        """(rows, heads, n, head_dim) → (rows, n, hidden)."""
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], self.heads * self.head_dim)

    def _codes(self, state: _State, batch: int, count: int) -> torch.Tensor:
        """Undo the delay: row k's codes start at position k // channels + 1."""
        rows = state.seq.view(batch, self.codebooks, self.max_length)
        starts = [k // self.channels + 1 for k in range(self.codebooks)]
        return torch.stack(
            [rows[:, k, start : start + count] for k, start in enumerate(starts)], dim=1
        ).clone()


def prompt_codes(codec: Any, values: torch.Tensor, padding_mask: Any = None) -> torch.Tensor:
    """Encodec's codes of prompt audio (batch, channels, samples) as the decoder reads them,
    (batch, codebooks, codes): each channel through the mono codec, and in stereo the
    channels' codebooks interleaved (left, right, left, …), as transformers lays them out."""
    with torch.inference_mode():
        per_channel = [
            codec.encode(values[:, c : c + 1], padding_mask).audio_codes[0]
            for c in range(values.shape[1])
        ]
    return torch.stack(per_channel, dim=2).flatten(1, 2)
