"""Sparrow's exception tree.

Every error a client can see is a ``SparrowError``; the class carries the HTTP
status and the stable ``code`` that appears in JSON bodies (and, later, in
stream events). One handler in ``sparrow.api.errors`` renders them as
``{"error": code, "detail": sentence}``.

    SparrowError
    ├── InvalidInput          422 invalid_input
    ├── Unauthorized          401 unauthorized
    ├── PaymentRequired       402 payment_required
    ├── NotFound              404 not_found
    ├── RequestTimeout        408 request_timeout
    ├── Conflict              409 conflict
    ├── PayloadTooLarge       413 payload_too_large
    ├── UnsupportedMedia      415 unsupported_media
    ├── RangeNotSatisfiable   416 range_not_satisfiable
    ├── Overloaded            429 overloaded
    ├── Unavailable           503 (with Retry-After): the server's trouble
    │   ├── EngineUnavailable     engine_unavailable
    │   └── StorageUnavailable    storage_unavailable
    └── GenerationFailed      500 generation_failed   (recorded on a node, never an HTTP answer)

Errors of the libraries underneath (sqlite, FFmpeg, torch) are translated into
these where they are caught, never in the routes.
"""

from __future__ import annotations


class SparrowError(Exception):
    status_code: int = 500
    code: str = "internal"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class InvalidInput(SparrowError):
    status_code = 422
    code = "invalid_input"


class Unauthorized(SparrowError):
    status_code = 401
    code = "unauthorized"


class PaymentRequired(SparrowError):
    status_code = 402
    code = "payment_required"


class NotFound(SparrowError):
    status_code = 404
    code = "not_found"


class RequestTimeout(SparrowError):
    status_code = 408
    code = "request_timeout"


class Conflict(SparrowError):
    status_code = 409
    code = "conflict"


class PayloadTooLarge(SparrowError):
    status_code = 413
    code = "payload_too_large"


class UnsupportedMedia(SparrowError):
    status_code = 415
    code = "unsupported_media"


class RangeNotSatisfiable(SparrowError):
    status_code = 416
    code = "range_not_satisfiable"

    def __init__(self, detail: str, size: int) -> None:
        super().__init__(detail)
        self.size = size


class Overloaded(SparrowError):
    status_code = 429
    code = "overloaded"

    def __init__(self, detail: str, retry_after_s: int = 5) -> None:
        super().__init__(detail)
        self.retry_after_s = retry_after_s


class Unavailable(SparrowError):
    """The server's own trouble, not the client's: a 503 with ``Retry-After``."""

    status_code = 503
    retry_after_s: int = 10


class EngineUnavailable(Unavailable):
    """An engine or FFmpeg cannot be used: missing, failing, hanging or lying."""

    code = "engine_unavailable"


class GenerationFailed(SparrowError):
    """The engine failed while generating (out of memory, a numerical fault …).

    Jobs record it on their nodes as ``error.code``; no route raises it.
    """

    status_code = 500
    code = "generation_failed"


class StorageUnavailable(Unavailable):
    """The database or the data dir cannot be used right now (disk full, read-only, I/O
    error, locked), or a stored file no longer matches what was recorded (damaged, missing)."""

    code = "storage_unavailable"
