"""Sparrow: the backend of an AI music-continuation editor."""

__version__ = "0.1.0"
