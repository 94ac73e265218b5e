"""Tiny random-weight models, saved the way real checkpoints are, so tests run the real engines.

    make_tiny_models(folder)     → TinyModels: MusicGen folders (mono, stereo), a Demucs repo
    make_tiny_musicgen(folder)   → a ``save_pretrained`` folder (model + processor); stereo too
    make_tiny_demucs(folder)     → a Demucs local repo holding one HTDemucs
    musicgen_shaped(size)        → (model, processor) shaped like facebook/musicgen-small/-medium

The weights are random, so the audio is noise-like, but every shape, config field and
file on disk is what the real checkpoints have: the engines load them through the same
``from_pretrained`` / ``get_model(name, repo=…)`` path as in production. Building is
deterministic (a fixed seed inside a forked RNG, so the caller's RNG is untouched).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from demucs.htdemucs import HTDemucs
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    EncodecConfig,
    EncodecFeatureExtractor,
    EncodecModel,
    GenerationConfig,
    MusicgenConfig,
    MusicgenDecoderConfig,
    MusicgenForConditionalGeneration,
    MusicgenProcessor,
    PreTrainedTokenizerFast,
    T5Config,
)
from transformers.models.encodec.modeling_encodec import EncodecEuclideanCodebook

SAMPLE_RATE = 32_000
FRAME_RATE = 50  # Encodec codes per second at 32 kHz: hop 640
NUM_CODEBOOKS = 4
CODEBOOK_SIZE = 2048  # also MusicGen's pad/bos token id (the decoder embeds vocab_size + 1)
DEMUCS_NAME = "tiny_htdemucs"
DEMUCS_SOURCES = ("drums", "bass", "other", "vocals")

_WORDS = (
    *("a", "an", "the", "and", "with", "of", "in", "on"),
    *("drums", "bass", "guitar", "piano", "synth", "strings", "vocals"),
    *("jazz", "rock", "pop", "ambient", "lofi", "techno", "house", "beat", "groove"),
    *("slow", "fast", "happy", "sad", "loud", "soft", "warm", "bright", "dark"),
)


@dataclass(frozen=True)
class TinyModels:
    musicgen: Path  # a save_pretrained folder: config, weights, generation config, processor
    musicgen_stereo: Path  # the same, stereo (as facebook/musicgen-stereo-*)
    demucs: Path  # a Demucs local repo folder
    demucs_name: str  # the model's signature inside that repo


def make_tiny_models(folder: Path) -> TinyModels:
    """Write a tiny MusicGen (mono and stereo) and a tiny HTDemucs under ``folder``."""
    return TinyModels(
        musicgen=make_tiny_musicgen(folder / "musicgen"),
        musicgen_stereo=make_tiny_musicgen(folder / "musicgen-stereo", channels=2),
        demucs=make_tiny_demucs(folder / "demucs"),
        demucs_name=DEMUCS_NAME,
    )


def make_tiny_musicgen(folder: Path, *, window_s: float = 30.0, channels: int = 1) -> Path:
    """A tiny MusicGen (T5 d_model 32, 2-layer decoder, 32 kHz Encodec, 4 codebooks).

    ``window_s`` sets the generation window (``max_length``) as musicgen's own
    generation config does for 30 s: a short window makes multi-window generation
    cheap to test. The weights do not depend on it. ``channels=2`` makes it stereo as
    facebook/musicgen-stereo-* are: the decoder has 8 codebooks, each channel's 4
    interleaved (left, right, left, …), over the same mono Encodec, and the feature
    extractor takes two channels.
    """
    model = _random_musicgen(
        text=T5Config(
            vocab_size=len(_WORDS) + 3,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=1,
            num_heads=4,
            pad_token_id=0,
            eos_token_id=1,
        ),
        audio=_encodec_config(hidden_size=16, num_filters=4, lstm_layers=1),
        decoder=MusicgenDecoderConfig(
            vocab_size=CODEBOOK_SIZE,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=64,
            num_codebooks=NUM_CODEBOOKS * channels,
            audio_channels=channels,
        ),
    )
    model.generation_config = _generation_config(window_s)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    _processor(channels).save_pretrained(folder)
    return folder


def make_tiny_demucs(folder: Path) -> Path:
    """A Demucs local repo with one tiny HTDemucs (``DEMUCS_NAME``): 44.1 kHz stereo, 4 stems.

    The file is Demucs' own package format (``{klass, args, kwargs, state}``, as
    ``demucs.states.serialize_model`` writes it, minus the training arguments), so
    ``demucs.pretrained.get_model(DEMUCS_NAME, repo=folder)`` loads it.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = HTDemucs(
            sources=list(DEMUCS_SOURCES),
            audio_channels=2,
            samplerate=44_100,
            channels=8,
            depth=4,
            t_layers=1,
            segment=1,  # seconds per chunk: small chunks keep the first (slowest) call short
        )
    args, kwargs = model._init_args_kwargs  # recorded by demucs' @capture_init
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)
    package = {"klass": HTDemucs, "args": args, "kwargs": kwargs, "state": state}
    torch.save(package, folder / f"{DEMUCS_NAME}.th")
    return folder


# Decoder shapes of the released checkpoints (hidden size, layers, heads, FFN); both use
# t5-base as the text encoder and the same 32 kHz Encodec.
SHAPES = {"small": (1024, 24, 16, 4096), "medium": (1536, 48, 24, 6144)}


def musicgen_shaped(
    size: str = "small",
) -> tuple[MusicgenForConditionalGeneration, MusicgenProcessor]:
    """A random-weight model with facebook/musicgen-``size``'s shapes (small ~590 M, medium
    ~1.5 B parameters).

    For benchmarks: the cost of a decoding step depends on shapes, not values. It is
    built in memory (small: about 2.3 GB in float32) and never saved.
    """
    hidden, layers, heads, ffn = SHAPES[size]
    model = _random_musicgen(
        text=T5Config(  # t5-base
            vocab_size=32_128,
            d_model=768,
            d_kv=64,
            d_ff=3072,
            num_layers=12,
            num_heads=12,
            pad_token_id=0,
            eos_token_id=1,
        ),
        audio=_encodec_config(hidden_size=128, num_filters=64, lstm_layers=2),
        decoder=MusicgenDecoderConfig(
            vocab_size=CODEBOOK_SIZE,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            ffn_dim=ffn,
            num_codebooks=NUM_CODEBOOKS,
        ),
    )
    model.generation_config = _generation_config(30.0)
    model.train(False)
    return model, _processor()


def _random_musicgen(
    *, text: T5Config, audio: EncodecConfig, decoder: MusicgenDecoderConfig
) -> MusicgenForConditionalGeneration:
    """Random weights, the same on every build, leaving the caller's RNG state alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = MusicgenForConditionalGeneration(
            MusicgenConfig(text_encoder=text, audio_encoder=audio, decoder=decoder)
        )
        _randomise_codebooks(model)
    return model


def _encodec_config(*, hidden_size: int, num_filters: int, lstm_layers: int) -> EncodecConfig:
    # musicgen's 32 kHz Encodec: hop 8·5·4·4 = 640 (50 Hz); 2.2 kbps, 11 bits a code = 4 codebooks.
    return EncodecConfig(
        sampling_rate=SAMPLE_RATE,
        audio_channels=1,
        normalize=False,
        hidden_size=hidden_size,
        num_filters=num_filters,
        num_residual_layers=1,
        num_lstm_layers=lstm_layers,
        upsampling_ratios=[8, 5, 4, 4],
        codebook_size=CODEBOOK_SIZE,
        codebook_dim=hidden_size,
        target_bandwidths=[2.2],
        use_causal_conv=False,
        use_conv_shortcut=False,
    )


@torch.no_grad()
def _randomise_codebooks(model: MusicgenForConditionalGeneration) -> None:
    """Spread the codebooks over the encoder's actual latent distribution.

    Encodec initialises its codebooks to zeros, so every prompt would encode to one
    code and every branch would sound alike. A random encoder's latents sit far from
    the origin with a small spread, so the first codebook is centred on their mean and
    each residual codebook matches the spread.
    """
    codec = model.audio_encoder
    assert isinstance(codec, EncodecModel)
    t = torch.arange(2 * SAMPLE_RATE) / SAMPLE_RATE
    probe = torch.cat([0.1 * torch.randn(2 * SAMPLE_RATE), 0.5 * torch.sin(1000 * t * (1 + t))])
    latents = codec.encoder(probe[None, None])[0]  # (dim, codes)
    mean, spread = latents.mean(dim=1), latents.std(dim=1)
    codebooks = [m for m in codec.quantizer.modules() if isinstance(m, EncodecEuclideanCodebook)]
    for i, codebook in enumerate(codebooks):
        centre = mean if i == 0 else torch.zeros_like(mean)
        embed = centre + spread * torch.randn_like(codebook.embed)
        codebook.embed.copy_(embed)
        codebook.embed_avg.copy_(embed)


def _generation_config(window_s: float) -> GenerationConfig:
    # As facebook/musicgen-*: 1503 = 30 s · 50 Hz + the delay pattern's num_codebooks − 1.
    return GenerationConfig(  # type: ignore[no-untyped-call]
        bos_token_id=CODEBOOK_SIZE,
        decoder_start_token_id=CODEBOOK_SIZE,
        pad_token_id=CODEBOOK_SIZE,
        do_sample=True,
        guidance_scale=3.0,
        top_k=250,
        max_length=round(window_s * FRAME_RATE) + NUM_CODEBOOKS - 1,
    )


def _processor(channels: int = 1) -> MusicgenProcessor:
    """A T5-like word tokenizer (appends ``</s>``: even "" is one token) + Encodec's extractor."""
    vocab = {word: i for i, word in enumerate(["<pad>", "</s>", "<unk>", *_WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]
    )
    return MusicgenProcessor(  # type: ignore[no-untyped-call]
        feature_extractor=EncodecFeatureExtractor(
            feature_size=channels, sampling_rate=SAMPLE_RATE, padding_value=0.0
        ),
        tokenizer=PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
            tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
        ),
    )
