"""What both daemons use, and nothing specific to either: errors, line-tracked YAML, the
systemd protocol, the admin listener, logging, upstream name resolution and the
forwarding-loop check. Imports nothing from `dnsoverride.dns` or `dnsoverride.registry`."""
