"""OCI distribution error responses: codes, HTTP statuses and the JSON envelope."""

from __future__ import annotations

import json
from collections.abc import Mapping

from aiohttp import web

# code -> HTTP status, per the distribution spec's error code table.
STATUS = {
    "BLOB_UNKNOWN": 404,
    "MANIFEST_UNKNOWN": 404,
    "NAME_UNKNOWN": 404,
    "NAME_INVALID": 400,
    "DIGEST_INVALID": 400,
    "TAG_INVALID": 400,
    "MANIFEST_INVALID": 400,
    "UNAUTHORIZED": 401,
    "DENIED": 403,
    "UNSUPPORTED": 405,
    "TOOMANYREQUESTS": 429,
    "UNAVAILABLE": 503,
    "UNKNOWN": 500,
}


class RegistryError(Exception):
    """A request that ends in an OCI error JSON response.

    `headers` go out with it: `Retry-After` on 429/503, the `WWW-Authenticate` challenge
    on 401.
    """

    def __init__(
        self,
        code: str,
        message: str,
        status: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status or STATUS[code]
        self.headers = dict(headers or {})

    def response(self, head: bool = False) -> web.Response:
        body = json.dumps(
            {"errors": [{"code": self.code, "message": self.message, "detail": None}]}
        ).encode()
        headers = {"Docker-Distribution-API-Version": "registry/2.0", **self.headers}
        if head:
            # A HEAD answer carries no body but keeps the status and headers.
            return web.Response(status=self.status, headers=headers)
        return web.Response(
            status=self.status, body=body, content_type="application/json", headers=headers
        )
