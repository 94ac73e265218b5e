"""Sparrow's benchmarks in one table: each measurement against its baseline, same run.

    python -m bench [--quick] [--only ROW ...] [--musicgen-shape tiny|small|medium]
                    [--device auto|cpu|cuda|cuda:N] [--torch-threads N]

Rows (``--only`` names):

- ``http``: small JSON routes of the real app against a bare Starlette app (req/s);
- ``spine``: the spine's recursive CTE at depth 1k, 10k, 100k against an indexed
  scan of the same rows (ms);
- ``sse``: event fan-out latency, publish to receipt, at 100 and 500 subscribers
  against 1 (ms);
- ``upload``: ``POST /api/chains`` of a 60 s FLAC and MP3 against
  ``ffmpeg -i … -f wav`` (audio s/s);
- ``export``: the spine's export to WAV and MP3 against an FFmpeg concat (audio s/s);
- ``decode``: Sparrow's MusicGen decoding loop against transformers' ``generate``
  at the same shape (steps/s; the tiny model by default);
- ``cluster``: PostgreSQL, replicas and workers as real processes — jobs per minute
  with 1, 2 and 4 mock workers against 1, event latency on another replica against
  the writing one, the spine's CTE on PostgreSQL against SQLite (needs Debian's
  ``postgresql`` server binaries; see ``bench.cluster``);
- ``analysis``: a 30 s node's analysis (ebur128 + librosa) and a continuation's
  loudness matching against FFmpeg reading the same audio (audio s/s; asserts the
  analysis takes under a second);
- ``concurrency``: 8 single-sibling branch requests on 8 chains sent at once against
  one alone, on the tiny MusicGen in a real ``sparrow serve``, batched across requests
  and with ``SPARROW_MAX_BATCH=1``; 4 requests arriving while a long batch decodes,
  until their first progress event; and rounds sent while the analyser works on the
  rounds before, against rounds with it idle (s; needs the ml extra).

``--quick`` is CI-sized (under 2 minutes on 2 cores; it leaves out spine depth
100,000); the full run takes about 5 minutes there. The machine is printed first,
then the table in markdown (stdout); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import importlib
import time
from collections.abc import Sequence

from bench.table import LEGEND, Options, Row, machine, markdown, progress

# Each row's module, imported only when its row runs: ``decode`` needs torch and
# transformers (the ml extra), the others do not.
GROUPS = {
    "http": "bench.http_routes",
    "spine": "bench.spine_depth",
    "sse": "bench.sse_fanout",
    "upload": "bench.upload",
    "export": "bench.export",
    "decode": "bench.musicgen_decode",
    "cluster": "bench.cluster",
    "analysis": "bench.analysis",
    "concurrency": "bench.concurrency",
}


def run(options: Options, names: Sequence[str]) -> list[Row]:
    """Run the named groups in order, reporting each one's wall time on stderr."""
    rows: list[Row] = []
    for name in names:
        progress(f"{name} …")
        started = time.perf_counter()
        group: list[Row] = importlib.import_module(GROUPS[name]).table_rows(options)
        rows += group
        progress(f"{name} done in {time.perf_counter() - started:.0f} s")
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI-sized: under 2 minutes")
    parser.add_argument(
        "--only", nargs="+", choices=list(GROUPS), metavar="ROW", help=f"of: {' '.join(GROUPS)}"
    )
    parser.add_argument("--musicgen-shape", default="tiny", choices=["tiny", "small", "medium"])
    parser.add_argument("--device", default="auto", help="decoding row: auto, cpu, cuda, cuda:N")
    parser.add_argument("--torch-threads", type=int, help="decoding row: torch's CPU threads")
    args = parser.parse_args(argv)
    options = Options(
        quick=args.quick,
        musicgen_shape=args.musicgen_shape,
        device=args.device,
        torch_threads=args.torch_threads,
    )
    names = args.only or list(GROUPS)
    started = time.perf_counter()
    print("## Machine\n")
    print("\n".join(machine(options)), flush=True)
    rows = run(options, names)
    print("\n## Results\n")
    print(markdown(rows))
    print(f"\n{LEGEND}")
    print(f"\nWall time of the run: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
