"""The torch device an engine runs on (imported only by the engines that use torch)."""

from __future__ import annotations

import torch


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` when a GPU is there, else ``cpu``; anything else as given."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device
