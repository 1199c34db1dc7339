"""The one exception type that reaches the user as a message instead of a traceback.

Anything raised as (a subclass of) `UserError` is printed by the CLI as
`dnsoverride: error: <message>` and turned into exit status 2 (1 for `check`).
"""


class UserError(Exception):
    """A problem the user can fix: bad flag, bad config, port in use, forwarding loop..."""
