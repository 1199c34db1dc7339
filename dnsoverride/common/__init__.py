"""What both daemons use, and nothing specific to either: errors and `Problem`,
line-tracked YAML (yamlsource), the one value grammar (grammar) and config idiom
(configfile), the service lifecycle (lifecycle) and the systemd protocol (systemd), the
admin listener, the hot-reload core (reloader) and how it reads files (readfile),
logging, upstream name resolution and the forwarding-loop check, and heap trimming.
Imports nothing from `dnsoverride.dns` or `dnsoverride.cache` (tests/test_layout.py
checks it)."""
