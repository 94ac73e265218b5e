"""The HTTP API: app factory, dependencies, schemas and one module per resource."""

from sparrow.api.app import create_app

__all__ = ["create_app"]
