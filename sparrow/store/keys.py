"""API keys: every SQL statement about them.

Only a key's SHA-256 is stored. Keys are looked up by that hash (an index), so
the key never meets a comparison in the database; the caller still compares the
stored hash in constant time.
"""

from __future__ import annotations

from sparrow.models import ApiKey, Tier
from sparrow.store.db import Database, Row

_COLUMNS = "id, name, tier, created_at"


def _key(row: Row) -> ApiKey:
    id_, name, tier, created_at = row[:4]
    return ApiKey(id=id_, name=name, tier=Tier(tier), created_at=created_at)


class KeyStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def insert(self, key: ApiKey, key_hash: str) -> None:
        async with self.db.transaction() as tx:
            await tx.run(
                f"INSERT INTO api_keys ({_COLUMNS}, key_hash) VALUES (?, ?, ?, ?, ?)",
                (key.id, key.name, key.tier.value, key.created_at, key_hash),
            )

    async def by_hash(self, key_hash: str) -> tuple[ApiKey, str] | None:
        """The key with this hash, and the stored hash (to compare in constant time)."""
        row = await self.db.fetchone(
            f"SELECT {_COLUMNS}, key_hash FROM api_keys WHERE key_hash = ?", (key_hash,)
        )
        return (_key(row), row[4]) if row else None

    async def with_hash(self, key_id: str) -> tuple[ApiKey, str] | None:
        """The key with this id, and its stored hash (the secret stream tokens are signed with)."""
        row = await self.db.fetchone(
            f"SELECT {_COLUMNS}, key_hash FROM api_keys WHERE id = ?", (key_id,)
        )
        return (_key(row), row[4]) if row else None

    async def get(self, key_id: str) -> ApiKey | None:
        row = await self.db.fetchone(f"SELECT {_COLUMNS} FROM api_keys WHERE id = ?", (key_id,))
        return _key(row) if row else None

    async def list(self) -> list[ApiKey]:
        rows = await self.db.fetchall(f"SELECT {_COLUMNS} FROM api_keys ORDER BY created_at, rowid")
        return [_key(r) for r in rows]

    async def set_tier(self, key_id: str, tier: Tier) -> bool:
        async with self.db.transaction() as tx:
            return (
                await tx.run("UPDATE api_keys SET tier = ? WHERE id = ?", (tier.value, key_id)) > 0
            )

    async def delete(self, key_id: str) -> bool:
        async with self.db.transaction() as tx:
            return await tx.run("DELETE FROM api_keys WHERE id = ?", (key_id,)) > 0
