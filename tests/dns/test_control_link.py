"""The supervisor-worker control link (dnsoverride/dns/controllink.py): whole messages
both ways whatever their size, and the ends of a link as a pipe's would be."""

from __future__ import annotations

import socket
import threading

import pytest

from dnsoverride.dns.controllink import ControlLink
from dnsoverride.dns.workerpool import Message


def test_messages_arrive_whole_and_in_order_whatever_their_size() -> None:
    """A scrape's exposition text from a worker with many upstreams and views runs to
    megabytes: far more than the socket buffer, so the sender blocks in `sendall` until
    the reader has taken the head of it."""
    ours, theirs = ControlLink.pair()
    big = 'dnsoverride_dns_queries_total{view="v"} 1\n' * 200_000  # 8.6 MB
    sent = [Message("metrics", big), Message("pong"), Message("ready", "0" * 64)]

    def send_all() -> None:
        for message in sent:
            theirs.send(message)

    sender = threading.Thread(target=send_all)
    sender.start()
    received = [ours.recv() for _ in sent]
    sender.join()
    assert received == sent
    ours.close()
    theirs.close()


def test_the_other_end_closing_is_eof_before_and_inside_a_message() -> None:
    ours, theirs = ControlLink.pair()
    theirs.close()
    with pytest.raises(EOFError):
        ours.recv()
    ours.close()

    # A worker killed while writing: its length said more than it sent.
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    right.sendall((1000).to_bytes(4, "big") + b"\x80\x05partial")
    right.close()
    with pytest.raises(EOFError):
        ControlLink(left).recv()
    left.close()


def test_a_closed_end_refuses_rather_than_handing_out_minus_one() -> None:
    """The pool removes a link's reader by its `fileno` after the link may have been
    closed: -1 there would be taken for a descriptor; a pipe raised OSError."""
    ours, theirs = ControlLink.pair()
    ours.close()
    with pytest.raises(OSError):
        ours.fileno()
    with pytest.raises(OSError):
        ours.send(Message("ping"))
    with pytest.raises(OSError):  # the other end is gone: EPIPE, not a silent loss
        theirs.send(Message("pong"))
    theirs.close()


def test_an_inherited_descriptor_is_the_same_link() -> None:
    ours, theirs = ControlLink.pair()
    inherited = ControlLink.inherited(socket.dup(theirs.fileno()))
    theirs.close()
    ours.send(Message("start", ("spec", 1)))
    assert inherited.recv() == Message("start", ("spec", 1))
    inherited.send(Message("ready", "h"))
    assert ours.recv() == Message("ready", "h")
    ours.close()
    inherited.close()
