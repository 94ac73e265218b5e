"""Asking the app's router which methods a request's path answers."""

from __future__ import annotations

from typing import Any

from starlette.routing import Match
from starlette.types import Scope


def serves(app: Any, scope: Scope, method: str) -> bool:
    """Whether some route of ``app`` fully matches ``scope``'s path with ``method``."""
    scope = {**scope, "method": method}
    return any(route.matches(scope)[0] is Match.FULL for route in app.router.routes)
