"""What the torch engines share (imported only by them): their device, and how their
failures are told."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from sparrow.engines.base import Cancelled, describe
from sparrow.errors import GenerationFailed


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` when a GPU is there, else ``cpu``; anything else as given."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


@contextmanager
def torch_failures(failed: str, *, out_of_memory: str) -> Iterator[None]:
    """Failures inside the block as ``GenerationFailed`` sentences (``failed: <the error>``,
    or ``out_of_memory`` after the GPU's cached memory is released); ``Cancelled`` passes."""
    try:
        yield
    except Cancelled:
        raise
    except torch.cuda.OutOfMemoryError as exc:
        torch.cuda.empty_cache()
        raise GenerationFailed(out_of_memory) from exc
    except Exception as exc:
        raise GenerationFailed(f"{failed}: {describe(exc)}") from exc
