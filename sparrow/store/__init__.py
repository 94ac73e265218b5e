"""All of Sparrow's SQL: the database, its migrations and the repositories."""

from sparrow.store.chains import ChainStore, ChainWriter
from sparrow.store.db import Database

__all__ = ["ChainStore", "ChainWriter", "Database"]
