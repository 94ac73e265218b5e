"""API keys and who a request comes from (SPEC §8).

A key is ``sk_`` followed by 256 random bits (URL-safe base64). The server
keeps only its SHA-256: a stolen database holds no usable key. A request's key
is hashed, looked up by that hash, and the stored hash compared with
``hmac.compare_digest``, so no comparison ever runs on the key itself and none
takes a time that depends on where two values differ.

With auth off every request is the one local user (``LOCAL_USER``), who sees
every chain and every feature.

Stream tokens. A browser's ``EventSource`` cannot send ``Authorization``, so a
key holder may ask for a short-lived token for one chain's event stream and put
it in the stream's URL (``?token=``). A token is ``<key id>.<expiry>.<MAC>``,
the MAC an HMAC-SHA256 of the key id, the chain id and the expiry under the
key's stored hash: it opens that one chain's stream until it expires, and no
longer once the key is revoked. It is worth nothing anywhere else.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time

from sparrow.errors import InvalidInput, NotFound, Unauthorized
from sparrow.models import LOCAL_USER, ApiKey, Caller, Tier, new_id, utc_now
from sparrow.store.keys import KeyStore

KEY_PREFIX = "sk_"
NAME_MAX = 100
STREAM_TOKEN_S = 300


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyService:
    def __init__(self, keys: KeyStore, *, enabled: bool) -> None:
        self.keys = keys
        self.enabled = enabled

    async def create(self, *, tier: Tier, name: str | None = None) -> tuple[ApiKey, str]:
        """A new key: its record, and the key itself (shown once, never stored)."""
        key_id = new_id()
        label = " ".join((name or "").split())
        if len(label) > NAME_MAX:
            raise InvalidInput(f"The name is longer than {NAME_MAX} characters.")
        record = ApiKey(
            id=key_id, name=label or f"key-{key_id[:8]}", tier=tier, created_at=utc_now()
        )
        key = new_key()
        await self.keys.insert(record, hash_key(key))
        return record, key

    async def caller(self, bearer: str | None) -> Caller:
        """Who sends ``bearer`` (the token of ``Authorization: Bearer``); 401 if nobody."""
        if not self.enabled:
            return LOCAL_USER
        if not bearer:
            raise Unauthorized("This server needs an API key: send Authorization: Bearer <key>.")
        digest = hash_key(bearer)
        found = await self.keys.by_hash(digest)
        if found is None or not hmac.compare_digest(found[1], digest):
            raise Unauthorized("The API key is not valid.")
        key = found[0]
        return Caller(owner=key.id, tier=key.tier)

    async def stream_token(self, caller: Caller, chain_id: str) -> tuple[str, int] | None:
        """A token opening this chain's event stream, and its lifetime in seconds; None
        with auth off (no token is needed). The caller must own the chain (checked by
        the caller of this method)."""
        if not self.enabled or caller.owner is None:
            return None
        found = await self.keys.with_hash(caller.owner)
        if found is None:
            raise Unauthorized("The API key is not valid.")
        expiry = int(time.time()) + STREAM_TOKEN_S
        mac = _stream_mac(found[1], caller.owner, chain_id, expiry)
        return f"{caller.owner}.{expiry}.{mac}", STREAM_TOKEN_S

    async def stream_caller(self, token: str, chain_id: str) -> Caller:
        """Who a stream token stands for, on this chain's stream; 401 if it does not open it."""
        refused = Unauthorized("The stream token is not valid for this chain, or has expired.")
        key_id, _, rest = token.partition(".")
        expiry, _, mac = rest.partition(".")
        if not (expiry.isascii() and expiry.isdigit() and len(expiry) <= 12):
            raise refused
        found = await self.keys.with_hash(key_id) if len(key_id) <= 64 else None
        if found is None or int(expiry) < time.time():
            raise refused
        expected = _stream_mac(found[1], key_id, chain_id, int(expiry))
        if not hmac.compare_digest(expected.encode(), mac.encode()):
            raise refused
        return Caller(owner=key_id, tier=found[0].tier)

    async def tier_of(self, owner: str | None) -> Tier | None:
        """The tier of the key that owns some work, now (None: no key owns it any more)."""
        if not self.enabled:
            return LOCAL_USER.tier
        if owner is None:
            return None
        key = await self.keys.get(owner)
        return key.tier if key else None

    async def set_tier(self, key_id: str, tier: Tier) -> None:
        if not await self.keys.set_tier(key_id, tier):
            raise NotFound(f"There is no key {key_id!r}.")

    async def revoke(self, key_id: str) -> None:
        if not await self.keys.delete(key_id):
            raise NotFound(f"There is no key {key_id!r}.")


def _stream_mac(secret: str, key_id: str, chain_id: str, expiry: int) -> str:
    message = f"stream\n{key_id}\n{chain_id}\n{expiry}".encode()
    digest = hmac.new(bytes.fromhex(secret), message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
