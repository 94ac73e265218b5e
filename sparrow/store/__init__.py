"""All of Sparrow's SQL: the databases, their migrations and the repositories."""

from sparrow.store.chains import ChainStore, ChainWriter
from sparrow.store.db import Database, open_database

__all__ = ["ChainStore", "ChainWriter", "Database", "open_database"]
