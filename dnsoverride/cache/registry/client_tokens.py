"""Bearer tokens the cache issues to its own clients: one challenge for anonymous and
authenticated clients alike.

docker answers a `Basic` challenge only with credentials: without them it fails the pull
("no basic auth credentials"), public images included; and when `/v2/` answers `200` it
never sends the credentials it has. So, like Docker Hub and Harbor, the cache challenges
with `Bearer`: the client fetches a token from the realm (`/token` on the host it asked),
with its credentials when it has them and anonymously otherwise, then sends the token.
A token names the user (or nobody) and its expiry, signed (HMAC-SHA256) with a key made
at start-up: tokens end with the process, and clients fetch new ones on the next
challenge.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import time

from aiohttp.web_request import BaseRequest

LIFETIME = 300  # seconds; clients renew before expiry (docker, containerd, skopeo)
SERVICE = "dnsoverride-registry"
# A Host header fit to go into the realm URL (no quotes, no spaces).
_HOST = re.compile(r"[A-Za-z0-9.-]+(:\d{1,5})?|\[[0-9A-Fa-f:.]+\](:\d{1,5})?")


class ClientTokens:
    def __init__(self) -> None:
        self._key = os.urandom(32)

    def issue(self, user: str | None) -> str:
        claims = f"{int(time.time()) + LIFETIME}:{user or ''}".encode()
        return f"{_encode(claims)}.{_encode(self._sign(claims))}"

    def user_of(self, token: str) -> str | None:
        """The user a valid token of ours names; None for an anonymous, expired, foreign or
        forged one (a client with a token not for us is an anonymous client)."""
        encoded, _, signature = token.partition(".")
        try:
            claims = _decode(encoded)
            valid = hmac.compare_digest(_decode(signature), self._sign(claims))
            expiry, _, user = claims.decode().partition(":")
            if not valid or int(expiry) < time.time():
                return None
        except ValueError:  # not base64 (binascii.Error), not UTF-8, no expiry
            return None
        return user or None

    def _sign(self, claims: bytes) -> bytes:
        return hmac.new(self._key, claims, hashlib.sha256).digest()


def realm(request: BaseRequest) -> str:
    """The token realm on the host the client asked (its Host header, when that is a
    host; else the address it connected to)."""
    host = request.host
    if not _HOST.fullmatch(host):
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        address, port = sockname[:2] if sockname else ("localhost", 80)
        host = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    return f"{request.scheme}://{host}/token"


def _encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
