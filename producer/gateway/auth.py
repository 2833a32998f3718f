"""Client keys and tenants.

With ``TOKENRELAY_API_KEYS`` set, every route needs ``Authorization: Bearer <key>`` (browsers'
``EventSource`` cannot send headers, so the events route also takes ``?access_token=``). Each key
is a tenant: its jobs carry a tag derived from the key (a hash, never the key), and another key
asking for them is told they do not exist. Without keys the gateway is open and jobs are shared.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

from starlette.requests import Request


class Unauthorized(Exception):
    """No key, or a key that is not one of the gateway's."""


class Auth:
    def __init__(self, keys: Sequence[str]) -> None:
        self._keys = tuple(key.encode() for key in keys)

    @property
    def open(self) -> bool:
        return not self._keys

    def tenant(self, request: Request, *, allow_query: bool = False) -> str | None:
        """The request's tenant tag (``None`` on an open gateway); ``Unauthorized`` if refused."""
        if self.open:
            return None
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        key = token.strip() if scheme.lower() == "bearer" else ""
        if not key and allow_query:
            key = request.query_params.get("access_token", "")
        if not key:
            raise Unauthorized("missing API key: send Authorization: Bearer <key>")
        given = key.encode()
        # Compare with every key, always, so timing tells nothing about which one matched.
        matched = False
        for known in self._keys:
            matched |= hmac.compare_digest(given, known)
        if not matched:
            raise Unauthorized("invalid API key")
        return tenant_of(key)


def tenant_of(key: str) -> str:
    """The opaque tag stored with a tenant's jobs: not reversible to the key."""
    return "t-" + hashlib.sha256(b"tokenrelay-tenant\0" + key.encode()).hexdigest()[:24]
