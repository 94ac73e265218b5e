"""The rows of ``python -m bench`` and how they print: the machine, then one markdown table.

Every row is a measurement and its baseline taken side by side in the same run;
the ratio is measured / baseline in the row's unit. For rates (req/s, audio s/s,
steps/s) above 1 is faster than the baseline; for latencies (ms) below 1 is.
"""

from __future__ import annotations

import os
import platform
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from sparrow.audio.ffmpeg import ffmpeg_exe

LEGEND = (
    "ratio = measured / baseline. Rates (req/s, audio s/s, steps/s): above 1 is faster "
    "than the baseline. Latencies (ms): below 1 is faster."
)


@dataclass(frozen=True)
class Options:
    """What ``python -m bench`` was asked for."""

    quick: bool = False
    musicgen_shape: str = "tiny"  # tiny, small or medium
    device: str = "auto"  # for the decoding row: auto, cpu, cuda or cuda:N
    torch_threads: int | None = None  # None: one for the tiny shape on a CPU, else torch's


@dataclass(frozen=True)
class Row:
    """One line of the table: what was measured, against what, in one unit."""

    name: str
    measured: float
    baseline: float
    unit: str

    @property
    def ratio(self) -> float:
        return self.measured / self.baseline if self.baseline else float("nan")


def progress(message: str) -> None:
    """A line on stderr while the run goes on (stdout is kept for the report)."""
    print(f"  {message}", file=sys.stderr, flush=True)


def amount(value: float, unit: str) -> str:
    """``value`` with about three significant digits, thousands separated, and its unit."""
    if abs(value) >= 100:
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    elif abs(value) >= 1:
        text = f"{value:.2f}"
    else:
        text = f"{value:.3f}"
    return f"{text} {unit}"


def markdown(rows: list[Row]) -> str:
    lines = ["| row | measured | baseline | ratio |", "|---|---:|---:|---:|"]
    for row in rows:
        lines.append(
            f"| {row.name} | {amount(row.measured, row.unit)} | "
            f"{amount(row.baseline, row.unit)} | {row.ratio:.2f} |"
        )
    return "\n".join(lines)


def machine(options: Options) -> list[str]:
    """What the numbers were taken on: CPU, cores, memory, versions, device, load."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return [
        f"- CPU: {_cpu_model()}, {os.cpu_count()} cores ({usable} usable); "
        f"memory {_memory_gib():.0f} GiB",
        f"- OS: {platform.platform()}",
        f"- Python {platform.python_version()}; {_torch(options.device)}",
        f"- SQLite {sqlite3.sqlite_version}; FFmpeg {_ffmpeg_version()}",
        f"- load average at start (1, 5, 15 min): {load}",
        f"- run: {'--quick' if options.quick else 'full'}",
    ]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _memory_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / (1 << 20)
    except OSError:
        pass
    return float("nan")


def _torch(device: str) -> str:
    try:
        import torch
    except ImportError:
        return "torch not installed (the decoding row needs the ml extra)"
    if torch.cuda.is_available() and device != "cpu":
        where = f"device {torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    else:
        where = f"device CPU ({torch.get_num_threads()} torch threads; no CUDA device)"
    return f"torch {torch.__version__}, {where}"


def _ffmpeg_version() -> str:
    exe = ffmpeg_exe()
    try:
        out = subprocess.run([exe, "-version"], capture_output=True, text=True, timeout=10)
    except OSError:
        return f"? ({exe})"
    words = out.stdout.split()
    version = words[2] if len(words) > 2 else "?"
    return f"{version} ({Path(exe).name})"
