"""bench/registry/nocopy.py: the server-limited bench's client fails the bench on a wrong
response instead of counting it, against a lying HTTP server on loopback."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterator

import pytest

from bench.registry.nocopy import measure

SIZE = 100_000


@contextlib.contextmanager
def liar(answer: bytes) -> Iterator[int]:
    """A server on a loopback port answering every GET on a connection with `answer`, and
    keeping the connection open; its port."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):  # the client closing first
            while not stop.is_set() and conn.recv(65536):
                conn.sendall(answer)
            stop.wait()

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = server.accept()
                threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        server.close()


def _head(status: str, length: int) -> bytes:
    return f"HTTP/1.1 {status}\r\nContent-Length: {length}\r\n\r\n".encode()


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("answer", "failure"),
    [
        # A short body on a connection kept open (before: the bench hung on it forever).
        (_head("200 OK", SIZE) + os.urandom(SIZE - 10), "timed out"),
        (_head("200 OK", SIZE - 1) + os.urandom(SIZE - 1), f"Content-Length {SIZE - 1}"),
        (_head("206 Partial Content", SIZE) + os.urandom(SIZE), "status line"),
        (_head("200 OK", SIZE) + os.urandom(SIZE + 7), "status line"),  # bytes past the end
    ],
    ids=["short-kept-open", "wrong-length", "not-200", "too-long"],
)
def test_a_wrong_response_fails_the_load(answer: bytes, failure: str) -> None:
    """Each wrong answer is a failure. Before: a short body on a connection kept open hung
    the bench forever (no receive timeout), and bytes past Content-Length went unnoticed
    (a status line after them still parsed as 200)."""
    with liar(answer) as port:
        got = measure(os.getpid(), port, "/blob", SIZE, clients=1, seconds=0.5, stall=1.0)
    assert got.load.failures == 1
    assert failure in got.load.first_failure, got.load.first_failure


def test_right_responses_are_counted() -> None:
    with liar(_head("200 OK", SIZE) + os.urandom(SIZE)) as port:
        got = measure(os.getpid(), port, "/blob", SIZE, clients=1, seconds=0.3, stall=1.0)
    assert got.load.failures == 0
    assert got.load.requests > 0
    assert got.load.body_bytes == got.load.requests * SIZE
