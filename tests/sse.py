"""A small Server-Sent Events client for tests: real socket, bounded time."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class Message:
    event: str = "message"
    data: str = ""
    id: str | None = None
    retry: int | None = None
    comments: list[str] = field(default_factory=list)

    @property
    def json(self) -> Any:
        return json.loads(self.data)


class Stream:
    """The messages of one open stream, parsed as a browser's EventSource does."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.lines = response.iter_lines()
        self.comments: list[str] = []
        self.retry: int | None = None

    def __iter__(self) -> Iterator[Message]:
        msg = Message()
        has_data = False
        for line in self.lines:
            if line == "":
                if has_data or msg.id is not None:
                    yield msg
                msg, has_data = Message(), False
                continue
            if line.startswith(":"):
                self.comments.append(line[1:].strip())
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "event":
                msg.event = value
            elif name == "data":
                msg.data = value if not has_data else msg.data + "\n" + value
                has_data = True
            elif name == "id":
                msg.id = value
            elif name == "retry":
                self.retry = msg.retry = int(value)

    def collect(
        self, until: Callable[[list[Message]], bool], *, timeout_s: float = 30
    ) -> list[Message]:
        """Messages until ``until(messages)`` holds; fails past the deadline."""
        got: list[Message] = []
        deadline = time.monotonic() + timeout_s
        for message in self:
            got.append(message)
            if until(got):
                return got
            if time.monotonic() > deadline:
                break
        raise AssertionError(f"stream ended or timed out after {len(got)} messages: {got[-3:]}")


@contextmanager
def open_stream(
    base: str,
    chain_id: str,
    *,
    last_event_id: str | None = None,
    read_timeout_s: float = 20,
    query: str = "",
) -> Iterator[Stream]:
    headers = {"Last-Event-ID": last_event_id} if last_event_id is not None else {}
    timeout = httpx.Timeout(5, read=read_timeout_s)
    with (
        httpx.Client(timeout=timeout) as client,
        client.stream(
            "GET", f"{base}/api/chains/{chain_id}/events{query}", headers=headers
        ) as response,
    ):
        assert response.status_code == 200, response.read()
        yield Stream(response)
