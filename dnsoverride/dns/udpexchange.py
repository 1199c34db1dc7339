"""One upstream query over UDP: its own socket, watched by a shared nested epoll.

Every upstream query gets a fresh socket, so a fresh random source port (an attacker
must guess it as well as the ID). Registering each of those sockets with the event
loop (`add_reader`, which `sock_recv` uses too) costs a libuv poll handle set up and
torn down per query, measured at 8 us on uvloop: a tenth of a cold forward. Instead the
sockets go into one epoll instance of our own (one `epoll_ctl` each; closing a socket
removes it), and only that epoll's descriptor is registered with the loop: when any
upstream socket is readable, the loop calls `SocketWatcher` once, which dispatches.

`UdpExchange` sends the query and calls `done` once with its outcome: the first
datagram that answers it (a checked `relay.Reply`), or the exception that ended it. Any
other datagram on the socket is unwanted (a forgery, or a stray late reply): counted,
and the `unwanted_limit`th ends it with `AbandonedError` so the caller asks again from a
fresh port with a fresh ID. At its deadline it ends with TimeoutError: not a timer
each (a loop timer set and cancelled costs 1.6 us on uvloop) but a queue of deadlines
in the watcher, in the order they come (a question's first exchange is due one attempt
timeout after it is sent, so they come in order), checked by one timer at most
`EXPIRY_SLACK` late; a deadline earlier than the last queued gets a timer of its own.
A callback rather than a future: the forwarder's common case (one reply, no retry) is
finished inside that callback, with no task or future per query. The exchange closes
its socket before calling `done`; `close()` ends it early (cancelled) without calling
`done`.
"""

from __future__ import annotations

import asyncio
import select
import socket
from collections import deque
from collections.abc import Callable

from dnsoverride.dns import relay
from dnsoverride.dns.logthrottle import DEFAULT_INTERVAL, ThrottledLog

_EVENTS = select.EPOLLIN | select.EPOLLONESHOT
EXPIRY_SLACK = 0.01  # seconds an exchange may end after its deadline


class AbandonedError(Exception):
    """Too many unwanted datagrams on one query's socket."""


class SocketWatcher:
    """A nested epoll: sockets registered with `watch` call back when readable (once per
    `watch`/`rearm`: EPOLLONESHOT, so a socket whose exchange is over cannot spin)."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, failure_log_interval: float = DEFAULT_INTERVAL
    ) -> None:
        self.loop = loop
        # A bug every upstream datagram meets must not cost a line per datagram.
        self._bug_log = ThrottledLog("upstream_exchange_failed", failure_log_interval)
        self._epoll = select.epoll()
        self._callbacks: dict[int, Callable[[], None]] = {}
        loop.add_reader(self._epoll.fileno(), self._ready)
        self._due: deque[tuple[float, Callable[[], None]]] = deque()  # deadlines in order
        self._timer: asyncio.TimerHandle | None = None

    def expire_at(self, deadline: float, expire: Callable[[], None]) -> None:
        """Call `expire()` at `deadline` (at most `EXPIRY_SLACK` later), whatever happened
        meanwhile: it must do nothing when its exchange is over."""
        due = self._due
        if due and deadline < due[-1][0]:
            self.loop.call_at(deadline, self._call, expire)
            return
        due.append((deadline, expire))
        if self._timer is None:
            self._timer = self.loop.call_at(deadline + EXPIRY_SLACK, self._expire_due)

    def _expire_due(self) -> None:
        self._timer = None
        due = self._due
        now = self.loop.time()
        while due and due[0][0] <= now:
            self._call(due.popleft()[1])
        if due:
            self._timer = self.loop.call_at(due[0][0] + EXPIRY_SLACK, self._expire_due)

    def watch(self, fd: int, callback: Callable[[], None]) -> None:
        """Call `callback()` when `fd` is readable; forget it with `forget` before closing."""
        self._callbacks[fd] = callback
        self._epoll.register(fd, _EVENTS)

    def rearm(self, fd: int) -> None:
        """Watch `fd` again after its callback ran."""
        self._epoll.modify(fd, _EVENTS)

    def forget(self, fd: int) -> None:
        """Stop calling back for `fd` (closing the socket removes it from the epoll)."""
        self._callbacks.pop(fd, None)

    def _ready(self) -> None:
        for fd, _events in self._epoll.poll(0):
            callback = self._callbacks.get(fd)
            if callback is not None:
                self._call(callback)

    def _call(self, callback: Callable[[], None]) -> None:
        """Call back for one socket or deadline: a bug in it must not stop the sockets
        or deadlines after it (nor, in the loop's handler, cost a traceback each)."""
        try:
            callback()
        except Exception as error:
            kind = type(error).__name__
            self._bug_log.emit(kind, error=f"{kind}: {str(error)[:200]}")

    def close(self) -> None:
        """Unregister from the loop and close the epoll."""
        if self._timer is not None:
            self._timer.cancel()
        self.loop.remove_reader(self._epoll.fileno())
        self._epoll.close()


class UdpExchange:
    """One query on its own connected UDP socket; `done(outcome)` is called once."""

    __slots__ = (
        "_done",
        "_exact_case",
        "_fd",
        "_left",
        "_packet",
        "_sock",
        "_unwanted",
        "_watcher",
    )

    def __init__(
        self,
        watcher: SocketWatcher,
        address: tuple[str, int],
        packet: bytes,
        *,
        deadline: float,
        exact_case: bool,
        unwanted: Callable[[], None],
        unwanted_limit: int,
        done: Callable[[relay.Reply | Exception], object],
    ) -> None:
        self._watcher = watcher
        self._packet = packet
        self._exact_case = exact_case
        self._unwanted = unwanted
        self._left = unwanted_limit
        self._done: Callable[[relay.Reply | Exception], object] | None = done
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        # The C socket type: socket.socket's Python-level __init__ and close() wrappers
        # (for makefile()) cost 0.7 us a query here, for nothing.
        self._sock = sock = socket.SocketType(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        self._fd = sock.fileno()
        try:
            # connect() picks a random ephemeral port and makes the kernel drop
            # datagrams from any other address.
            sock.connect(address)
            sock.send(packet)
            watcher.watch(self._fd, self._readable)
        except BaseException:
            sock.close()
            raise
        watcher.expire_at(deadline, self._expire)

    def _expire(self) -> None:
        if self._done is not None:
            self._finish(TimeoutError())

    def _readable(self) -> None:
        while self._done is not None:
            try:
                data = self._sock.recv(65535)
            except BlockingIOError:
                self._watcher.rearm(self._fd)
                return
            except OSError as error:  # ICMP port unreachable: nobody listens there
                self._finish(error)
                return
            if relay.answers_query(self._packet, data, exact_case=self._exact_case):
                try:
                    reply = relay.scan(data, relay.question_end(self._packet))
                except ValueError:
                    pass  # right ID and question but malformed: as unwanted as a forgery
                else:
                    self._finish(reply)
                    return
            self._unwanted()
            self._left -= 1
            if self._left <= 0:
                self._finish(AbandonedError())

    def _finish(self, outcome: relay.Reply | Exception) -> None:
        done = self._done
        if done is not None:
            self.close()
            done(outcome)

    def close(self) -> None:
        """Stop the timer and close the socket; `done` is not called after this."""
        if self._done is None:
            return
        self._done = None  # and what it held: the exchange stays queued until its deadline
        self._watcher.forget(self._fd)
        self._sock.close()
