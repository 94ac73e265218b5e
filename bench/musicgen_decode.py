"""MusicGen decoding loops side by side: Sparrow's own against transformers' ``generate``.

    python -m bench.musicgen_decode [--device auto|cpu|cuda] [--shapes small medium]
                                    [--seconds 10 30] [--batches 1 4 8] [--repeat 3]

Both run through ``MusicGenEngine.generate`` on the same random-weight model (speed
depends on shapes, not values) with guidance 3, top-k 250 and a text prompt — the
engine's whole path: text encoder, every decoding step, sampling, and Encodec — and
differ only in the decoding loop (``decoder="transformers"`` or ``"sparrow"``); their
samples are interleaved. On a GPU the model runs in bfloat16 with SDPA; Sparrow's loop
adds its static cache and CUDA graphs. The first call of each shape is a warm-up (it
captures the graphs).

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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench.table import Options, Row
from bench.timing import rotations
from sparrow.engines.base import Continuation
from sparrow.engines.musicgen import MusicGenEngine
from sparrow.engines.tiny import make_tiny_musicgen, musicgen_shaped
from sparrow.errors import EngineUnavailable
from sparrow.models import Sampling

LOOPS = ("transformers", "sparrow")


def timed(engine: MusicGenEngine, seconds: float, batch: int, repeat: int) -> tuple[int, float]:
    """(decoding steps, median wall seconds) of one generation of ``batch`` siblings."""
    empty = np.zeros((0, engine.channels), np.float32)
    request = Continuation(
        empty,
        ("lofi beat with warm piano",) * batch,
        tuple(range(batch)),
        Sampling(duration_s=seconds),
    )
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


def compare_loops(
    engines: dict[str, MusicGenEngine], seconds: float, batch: int, repeat: int
) -> dict[str, tuple[int, float]]:
    """(decoding steps, median wall seconds) per loop, sampled interleaved.

    Each loop first makes a short warm-up generation (allocations, CUDA graphs).
    """
    for engine in engines.values():
        timed(engine, min(seconds, 0.5), batch, 1)
    walls: dict[str, list[float]] = {loop: [] for loop in engines}
    steps: dict[str, int] = {}
    for order in rotations(list(engines), repeat):
        for loop in order:
            steps[loop], wall = timed(engines[loop], seconds, batch, 1)
            walls[loop].append(wall)
    return {loop: (steps[loop], statistics.median(walls[loop])) for loop in engines}


def engines_for(shape: str, device: str, folder: Path) -> dict[str, MusicGenEngine]:
    """One engine per decoding loop over the same model.

    ``tiny``: the test suite's tiny model, saved to ``folder`` and loaded like a real
    checkpoint; ``small``/``medium``: a random-weight model of that shape, in memory.
    """
    if shape == "tiny":
        saved = make_tiny_musicgen(folder / "tiny")
        return {loop: MusicGenEngine(str(saved), device, loop) for loop in LOOPS}
    model, processor = musicgen_shaped(shape)
    return {
        loop: MusicGenEngine.from_model(
            model, processor, name=f"musicgen-{shape}-shaped", device=device, decoder=loop
        )
        for loop in LOOPS
    }


def resolve(device: str) -> str:
    """``auto``: CUDA when available, else the CPU."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


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
            results = compare_loops(engines, duration, batch, repeat)
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


@dataclass(frozen=True)
class Sizes:
    seconds: float
    batches: tuple[int, ...]
    repeat: int


def sizes_for(shape: str, device: str, quick: bool) -> Sizes:
    """Generation sizes for the table: 10 s of audio on a GPU, a fraction of that on a CPU."""
    if device.startswith("cuda"):
        return Sizes(5.0, (1,), 1) if quick else Sizes(10.0, (1, 4), 3)
    if shape == "tiny":
        return Sizes(1.0, (1,), 3) if quick else Sizes(4.0, (1, 4), 5)
    return Sizes(0.5, (1,), 1)  # a step of the small shape takes about a second on 2 cores


def table_rows(options: Options) -> list[Row]:
    """Sparrow's loop against transformers' ``generate``, as decoding steps per second.

    On the CPU the tiny shape runs with one torch thread unless ``--torch-threads``
    says otherwise: its operations are too small to share, and a second thread
    that spin-waits on a shared 2-core machine slows both loops many times over.
    """
    torch.set_grad_enabled(False)
    device = resolve(options.device)
    if options.torch_threads:
        torch.set_num_threads(options.torch_threads)
    elif options.musicgen_shape == "tiny" and not device.startswith("cuda"):
        torch.set_num_threads(1)
    sizes = sizes_for(options.musicgen_shape, device, options.quick)
    where = device if device.startswith("cuda") else f"{device} ({_threads()})"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        engines = engines_for(options.musicgen_shape, device, Path(tmp))
        for batch in sizes.batches:
            results = compare_loops(engines, sizes.seconds, batch, sizes.repeat)
            steps, theirs = results["transformers"]
            _, ours = results["sparrow"]
            rows.append(
                Row(
                    f"decoding, {options.musicgen_shape} shape, batch {batch}, {sizes.seconds:g} s "
                    f"on {where}: Sparrow loop vs transformers generate",
                    steps / ours,
                    steps / theirs,
                    "steps/s",
                )
            )
    return rows


def _threads() -> str:
    n = torch.get_num_threads()
    return f"{n} thread{'s' if n > 1 else ''}"


def main(args: argparse.Namespace) -> None:
    torch.set_grad_enabled(False)
    device = resolve(args.device)
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
            compare("tiny", engines_for("tiny", device, Path(tmp)), [4.0], batches, args.repeat)
        for shape in shapes:
            engines = engines_for(shape, device, Path(tmp))
            compare(shape, engines, seconds, batches, args.repeat)
            del engines
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
