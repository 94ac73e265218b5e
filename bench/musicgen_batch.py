"""MusicGen batch scaling: 4 siblings in one batch against 1, measured in the same run.

    python -m bench.musicgen_batch [--device auto|cpu|cuda] [--duration 1] [--context 1]
                                   [--repeat 3] [--tiny-duration 4] [--no-small]

Times ``MusicGenEngine.generate`` — the engine's whole path: prompt encoding, every
decoding step (with classifier-free guidance, so the decoder sees twice the batch),
the per-sibling sampler and the row-by-row Encodec decode — for ``count`` 1 and 4 at
the same duration, on:

- ``tiny``: the test suite's tiny random-weight model, saved and loaded from a folder;
- ``small``: a random-weight model with facebook/musicgen-small's shapes (~590 M
  parameters), built in memory. Values do not matter for speed; shapes do.

Columns: decoding steps per generation, median wall time, ms per decoding step,
real-time factor per sibling (audio seconds per wall second; > 1 is faster than real
time), audio seconds produced per wall second over all siblings, and the ratio of
batch 4's time to batch 1's (1.0 would be perfect batching; 4.0 no gain at all).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sparrow.engines.base import Continuation
from sparrow.engines.musicgen import MusicGenEngine
from sparrow.engines.tiny import make_tiny_musicgen, musicgen_shaped
from sparrow.errors import EngineUnavailable
from sparrow.models import Sampling

COUNTS = (1, 4)


def measure(
    engine: MusicGenEngine, context_s: float, duration_s: float, count: int, repeat: int
) -> tuple[int, float]:
    """(decoding steps, median seconds) of one generation of ``count`` siblings."""
    rng = np.random.default_rng(0)
    frames = round(context_s * engine.sample_rate)
    context = (0.1 * rng.standard_normal((frames, engine.channels))).astype(np.float32)
    request = Continuation(
        context,
        ("lofi beat with warm piano",) * count,
        tuple(range(count)),
        Sampling(duration_s=duration_s),
    )
    samples, steps = [], 0
    for _ in range(repeat):
        calls: list[float] = []
        start = time.perf_counter()
        engine.generate(request, calls.append)
        samples.append(time.perf_counter() - start)
        steps = len(calls)
    return steps, statistics.median(samples)


def run(
    name: str, engine: MusicGenEngine, context_s: float, duration_s: float, repeat: int
) -> None:
    measure(engine, context_s, min(duration_s, 0.2), 1, 1)  # warm-up: first-call allocations
    results = {count: measure(engine, context_s, duration_s, count, repeat) for count in COUNTS}
    base = results[COUNTS[0]][1]
    for count, (steps, seconds) in results.items():
        print(
            f"{name:<7}{count:>6}{duration_s:>8.2f}{steps:>7}{seconds:>9.2f}"
            f"{seconds / steps * 1e3:>10.1f}{duration_s / seconds:>8.2f}"
            f"{count * duration_s / seconds:>9.2f}{seconds / base:>9.2f}"
        )


def main(args: argparse.Namespace) -> None:
    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        tiny = MusicGenEngine(str(make_tiny_musicgen(Path(tmp) / "tiny")), device=args.device)
        tiny.load()
        info = tiny.info()
        print(
            f"device {info.device} ({info.dtype}), {torch.get_num_threads()} CPU threads; "
            f"tiny model built and loaded in {time.perf_counter() - started:.1f} s"
        )
        small: MusicGenEngine | None = None
        if args.small:
            started = time.perf_counter()
            model, processor = musicgen_shaped("small")
            small = MusicGenEngine.from_model(
                model, processor, name="musicgen-small-shaped", device=args.device
            )
            params = sum(p.numel() for p in model.parameters()) / 1e6
            print(
                f"small-shaped model ({params:.0f} M parameters) built in "
                f"{time.perf_counter() - started:.1f} s"
            )
        print(
            f"\n{'model':<7}{'count':>6}{'audio s':>8}{'steps':>7}{'wall s':>9}"
            f"{'ms/step':>10}{'RTF':>8}{'audio/s':>9}{'× b1':>9}"
        )
        run("tiny", tiny, args.context, args.tiny_duration, args.repeat)
        if small is not None:
            run("small", small, args.context, args.duration, args.repeat)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--duration", type=float, default=1.0, help="seconds, small model")
    parser.add_argument("--tiny-duration", type=float, default=4.0, help="seconds, tiny model")
    parser.add_argument("--context", type=float, default=1.0, help="seconds of audio prompt")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--small", action=argparse.BooleanOptionalAction, default=True, help="musicgen-small shape"
    )
    try:
        main(parser.parse_args())
    except EngineUnavailable as exc:
        raise SystemExit(exc.detail) from exc
