"""Receiving a multipart upload by streaming it to disk.

Starlette's form parser spools a whole file before the route runs, which
would read a 10 GB body before saying 413. This parser writes the ``file``
part to disk chunk by chunk while counting, and stops at the first byte past
the limit. A ``Content-Length`` already over the limit is refused before any
of the body is read.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header
from starlette.requests import ClientDisconnect, Request

from sparrow.audio.storage import storage_failure
from sparrow.errors import (
    InvalidInput,
    PayloadTooLarge,
    RequestTimeout,
)

FIELD_MAX_BYTES = 4096  # for the small text fields (title)
KNOWN_FIELDS = ("file", "title")
MAX_PARTS = 8
MAX_BOUNDARY = 70  # RFC 2046
ENVELOPE_BYTES = 64 * 1024  # multipart boundaries, part headers and small fields


@dataclass
class ReceivedUpload:
    path: Path
    filename: str | None
    fields: dict[str, str]


@dataclass
class _Part:
    name: str = ""
    filename: str | None = None
    headers: dict[bytes, bytes] = field(default_factory=dict)
    data: bytearray = field(default_factory=bytearray)
    is_file: bool = False


class _Receiver:
    """python-multipart callbacks; the file part's bytes wait in ``pending`` for the disk."""

    def __init__(self, max_file_bytes: int, mb_limit: float) -> None:
        self.pending: list[bytes] = []
        self.max_file_bytes = max_file_bytes
        self.mb_limit = mb_limit
        self.file_bytes = 0
        self.file_seen = False
        self.filename: str | None = None
        self.fields: dict[str, str] = {}
        self.parts = 0
        self._part = _Part()
        self._header_name = b""
        self._header_value = b""

    def on_part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise InvalidInput(f"Too many form fields (at most {MAX_PARTS}).")
        self._part = _Part()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        self._part.headers[self._header_name.lower()] = self._header_value
        self._header_name = self._header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._part.headers.get(b"content-disposition", b""))
        if b"name" not in options:
            raise InvalidInput("Every form part needs a Content-Disposition name.")
        self._part.name = _text(options[b"name"], "field name")
        if self._part.name not in KNOWN_FIELDS:
            raise InvalidInput(
                f"Sparrow does not read a form field named {self._part.name[:40]!r}; send the "
                "clip in a field named 'file' (and optionally a 'title')."
            )
        if self._part.name == "file":
            if self.file_seen:
                raise InvalidInput("Send exactly one 'file' field.")
            self.file_seen = True
            self._part.is_file = True
            if b"filename" in options:
                self.filename = _text(options[b"filename"], "file name")[:255]

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._part.is_file:
            self.file_bytes += end - start
            if self.file_bytes > self.max_file_bytes:
                raise PayloadTooLarge(f"The upload is larger than the {self.mb_limit:g} MB limit.")
            self.pending.append(data[start:end])
        else:
            self._part.data += data[start:end]
            if len(self._part.data) > FIELD_MAX_BYTES:
                raise InvalidInput(
                    f"Form field {self._part.name!r} is longer than {FIELD_MAX_BYTES} bytes."
                )

    def on_part_end(self) -> None:
        if not self._part.is_file:
            self.fields[self._part.name] = _text(bytes(self._part.data), self._part.name)


def _text(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"The {what} is not valid UTF-8.") from exc


async def receive_upload(
    request: Request, dest: Path, *, max_file_bytes: int, idle_timeout_s: float
) -> ReceivedUpload:
    """Stream the request's multipart body to ``dest``; raise a SparrowError on bad input.

    A client that sends nothing for ``idle_timeout_s`` is dropped (408). On any
    error ``dest`` is removed.
    """
    mb_limit = max_file_bytes / 1_000_000
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary", b"")
    if content_type != b"multipart/form-data" or not boundary:
        raise InvalidInput("Send the clip as multipart/form-data with a 'file' field.")
    if len(boundary) > MAX_BOUNDARY:
        raise InvalidInput(f"The multipart boundary is longer than {MAX_BOUNDARY} characters.")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_file_bytes + ENVELOPE_BYTES:
        raise PayloadTooLarge(f"The upload is larger than the {mb_limit:g} MB limit.")

    receiver = _Receiver(max_file_bytes, mb_limit)
    try:
        async with await anyio.open_file(dest, "wb") as out:
            parser = MultipartParser(
                boundary,
                {
                    "on_part_begin": receiver.on_part_begin,
                    "on_part_data": receiver.on_part_data,
                    "on_part_end": receiver.on_part_end,
                    "on_header_field": receiver.on_header_field,
                    "on_header_value": receiver.on_header_value,
                    "on_header_end": receiver.on_header_end,
                    "on_headers_finished": receiver.on_headers_finished,
                },
            )
            try:
                chunks = request.stream()
                while True:
                    with anyio.fail_after(idle_timeout_s):
                        chunk = await anext(chunks, None)
                    if chunk is None:
                        break
                    parser.write(chunk)
                    if receiver.pending:
                        await out.write(b"".join(receiver.pending))
                        receiver.pending.clear()
                    if parser.state == MultipartState.END:
                        break  # an epilogue after the closing boundary is not read
                parser.finalize()
            except TimeoutError as exc:
                raise RequestTimeout(
                    f"The upload stalled: nothing arrived for {idle_timeout_s:g} s."
                ) from exc
            except ClientDisconnect as exc:
                raise InvalidInput("The client went away before the upload finished.") from exc
            except FormParserError as exc:
                raise InvalidInput("The multipart body is malformed.") from exc
    except OSError as exc:  # the data dir is full, read-only or not ours to write
        with contextlib.suppress(OSError):
            await anyio.Path(dest).unlink(missing_ok=True)
        raise storage_failure(exc, "receiving the upload") from exc
    except BaseException:
        await anyio.Path(dest).unlink(missing_ok=True)
        raise

    problem = None
    if parser.state != MultipartState.END:
        problem = "The multipart body ended before its closing boundary; the upload is incomplete."
    elif not receiver.file_seen:
        problem = "The form has no 'file' field."
    if problem:
        await anyio.Path(dest).unlink(missing_ok=True)
        raise InvalidInput(problem)
    return ReceivedUpload(path=dest, filename=receiver.filename, fields=receiver.fields)
