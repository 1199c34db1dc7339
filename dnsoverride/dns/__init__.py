"""`dnsoverride serve`: the whole DNS server. Its config (config.py) and what `check`
validates of it (check.py); the zones (zones/: parsed, validated, held by LiveZones) and
their hot reload (reload.py, over common/reloader.py); the stages of a query, one module
each (listener -> ACL -> view -> answer cache -> overrides -> response cache -> forwarder
-> rate limit, declared in resolver.py); health-gated overrides (health.py); daemon.py
wires them together as a DnsService, in one process or several (workerpool.py). wire.py
and relay.py read and build DNS messages by hand where dnslib would cost more than the
answer (cache hits, cold forwards), with the protocol numbers of constants.py;
udpexchange.py is one upstream query's socket; logthrottle.py keeps floods from filling
the journal. docs/architecture.md has the map."""
