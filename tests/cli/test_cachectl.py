"""`dnsoverride cache warm` against an admin endpoint that is not a dnsoverride cache's:
one line naming the endpoint, never a traceback. Failed on s14-ops: a `/warm/jobs` answer
that was not a job raised AssertionError from the progress poll."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from dnsoverride import adminclient, cachectl
from dnsoverride.common.errors import UserError


class _NotACache(BaseHTTPRequestHandler):
    """Answers /warm with a running job, and /warm/jobs with a list (not a job)."""

    def _json(self, document: object) -> None:
        body = json.dumps(document).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        self._json({"job": 1, "state": "running", "image": "x"})

    def do_GET(self) -> None:
        self._json(["not", "a", "job"])

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def not_a_cache() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NotACache)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_warm_poll_answered_with_no_job_is_one_error(not_a_cache: str) -> None:
    admin = adminclient.parse_admin(not_a_cache)
    with pytest.raises(UserError, match=f"{not_a_cache} .*: /warm/jobs did not answer job 1"):
        cachectl.warm(admin, ["x"], listed=False, as_json=False)
