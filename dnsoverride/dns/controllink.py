"""The control link between the DNS supervisor and one worker process: picklable objects
(the pool's `Message`s), each sent as its pickle behind a 4-byte big-endian length, over
one end of a Unix stream socket pair.

Not `multiprocessing.Pipe`, which frames its messages the same way: importing
`multiprocessing.connection` (and the multiprocessing package) cost every `serve` process
0.3 MiB of its 32.9 MiB idle RSS, measured. Both ends are ours, started together: the
pickles come from nowhere else.
"""

from __future__ import annotations

import pickle
import socket
import struct
from typing import Any

_LENGTH = struct.Struct("!I")


class ControlLink:
    """One end of the link. `send` and `recv` block until the whole message is through, as
    a pipe's would; the event loop calls `recv` when `fileno` is readable."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    @classmethod
    def pair(cls) -> tuple[ControlLink, ControlLink]:
        """Two connected ends: one kept, one whose `fileno` a child inherits."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        return cls(ours), cls(theirs)

    @classmethod
    def inherited(cls, fd: int) -> ControlLink:
        """The end whose descriptor `fd` this process inherited."""
        return cls(socket.socket(fileno=fd))

    def fileno(self) -> int:
        """The socket's descriptor; OSError once closed (never -1, which a reader would
        take for a descriptor)."""
        fd = self._sock.fileno()
        if fd < 0:
            raise OSError("control link closed")
        return fd

    def send(self, message: object) -> None:
        """Send `message` whole (OSError when the other end is gone or this one closed)."""
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        self._sock.sendall(_LENGTH.pack(len(data)) + data)

    def recv(self) -> Any:
        """The next message; EOFError when the other end closed (before or inside it)."""
        (length,) = _LENGTH.unpack(self._read(_LENGTH.size))
        return pickle.loads(self._read(length))

    def close(self) -> None:
        self._sock.close()

    def _read(self, size: int) -> bytearray:
        data = bytearray(size)
        view = memoryview(data)
        while view:
            count = self._sock.recv_into(view)
            if count == 0:
                raise EOFError("control link closed by the other end")
            view = view[count:]
        return data
