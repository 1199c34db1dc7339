"""What the cache's admin side shows in place of a repository or image name, a digest or
a failure's reason on an admin listener others reach (`/status` and `/metrics` there:
README "Who can read what"); the control socket and a loopback listener show them. Here
beside the warm list's metrics, its first user; cache/status.py uses it for both sides."""

from __future__ import annotations

WITHHELD = "(withheld)"


def withheld(number: int) -> str:
    """The stand-in for the `number`th (from 1) of a list of names: entries stay apart,
    and the host's own `status` lists them in the same order."""
    return f"{WITHHELD} {number}"
