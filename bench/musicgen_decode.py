"""MusicGen decoding loops side by side: Sparrow's own against transformers' ``generate``.

    python -m bench.musicgen_decode [--device auto|cpu|cuda] [--shapes small medium]
                                    [--seconds 10 30] [--batches 1 4 8] [--repeat 3]

Both run through ``MusicGenEngine.generate`` on the same random-weight model (speed
depends on shapes, not values) with guidance 3, top-k 250 and a text prompt — the
engine's whole path: text encoder, every decoding step, sampling, and Encodec — and
differ only in the decoding loop (``decoder="transformers"`` or ``"sparrow"``). On
a GPU the model runs in bfloat16 with SDPA; Sparrow's loop adds its static cache and
CUDA graphs. The first call of each shape is a warm-up (it captures the graphs).

Columns: shape, audio seconds, batch, decoding steps, then for each loop the median
wall time, ms per step and real-time factor (audio seconds per wall second, per
sibling), then transformers' time over Sparrow's (× faster) and Sparrow's time at
this batch over its time at the first batch (batching cost).

CPU defaults (``--device cpu``): the tiny model and the small shape for 0.5 s,
batches 1 and 4 — a decoding step of the small shape takes ~0.2 s there.
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

LOOPS = ("transformers", "sparrow")


def timed(engine: MusicGenEngine, seconds: float, batch: int, repeat: int) -> tuple[int, float]:
    """(decoding steps, median wall seconds) of one generation of ``batch`` siblings."""
    empty = np.zeros((0, engine.channels), np.float32)
    request = Continuation(empty, "lofi beat with warm piano", seconds, tuple(range(batch)))
    walls, steps = [], 0
    for _ in range(repeat):
        calls: list[float] = []
        _sync(engine)
        start = time.perf_counter()
        engine.generate(request, calls.append)
        _sync(engine)
        walls.append(time.perf_counter() - start)
        steps = len(calls)
    return steps, statistics.median(walls)


def _sync(engine: MusicGenEngine) -> None:
    if engine.device.startswith("cuda"):
        torch.cuda.synchronize(engine.device)


def compare(
    name: str,
    engines: dict[str, MusicGenEngine],
    seconds: list[float],
    batches: list[int],
    repeat: int,
) -> None:
    for duration in seconds:
        first: float | None = None
        for batch in batches:
            results = {}
            for loop, engine in engines.items():
                timed(engine, min(duration, 0.5), batch, 1)  # warm-up: allocations, graphs
                results[loop] = timed(engine, duration, batch, repeat)
            steps, theirs = results["transformers"]
            _, ours = results["sparrow"]
            first = first or ours
            cells = "".join(
                f"{wall:>9.2f}{wall / steps * 1e3:>9.1f}{duration / wall:>7.2f}"
                for _, wall in results.values()
            )
            print(
                f"{name:<7}{duration:>6.1f}{batch:>6}{steps:>7}{cells}"
                f"{theirs / ours:>9.2f}{ours / first:>8.2f}"
            )


def main(args: argparse.Namespace) -> None:
    torch.set_grad_enabled(False)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    on_gpu = device.startswith("cuda")
    shapes = args.shapes or (["small", "medium"] if on_gpu else ["small"])
    seconds = args.seconds or ([10.0, 30.0] if on_gpu else [0.5])
    batches = args.batches or ([1, 4, 8] if on_gpu else [1, 4])
    name = (
        torch.cuda.get_device_name(device) if on_gpu else f"CPU, {torch.get_num_threads()} threads"
    )
    print(f"device {device} ({name}); guidance 3, top-k 250; median of {args.repeat}")
    header = "".join(f"{c:>9}{'ms/step':>9}{'RTF':>7}" for c in ("hf s", "ours s"))
    print(f"\n{'model':<7}{'audio':>6}{'batch':>6}{'steps':>7}{header}{'× hf':>9}{'× b1':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        if not on_gpu:
            folder = make_tiny_musicgen(Path(tmp) / "tiny")
            tiny = {loop: MusicGenEngine(str(folder), device, loop) for loop in LOOPS}
            compare("tiny", tiny, [4.0], batches, args.repeat)
        for shape in shapes:
            model, processor = musicgen_shaped(shape)
            engines = {
                loop: MusicGenEngine.from_model(
                    model, processor, name=f"musicgen-{shape}-shaped", device=device, decoder=loop
                )
                for loop in LOOPS
            }
            compare(shape, engines, seconds, batches, args.repeat)
            del model, engines
            if on_gpu:
                torch.cuda.empty_cache()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--shapes", nargs="+", choices=["small", "medium"])
    parser.add_argument("--seconds", nargs="+", type=float)
    parser.add_argument("--batches", nargs="+", type=int)
    parser.add_argument("--repeat", type=int, default=3)
    try:
        main(parser.parse_args())
    except EngineUnavailable as exc:
        raise SystemExit(exc.detail) from exc
