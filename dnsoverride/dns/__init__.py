"""`dnsoverride serve`: the DNS server's stages (listener -> ACL -> view -> overrides ->
cache -> forwarder -> rate limit), one module each; daemon.py wires them together.
wire.py and relay.py read and build DNS messages by hand where dnslib would cost more
than the answer (cache hits, cold forwards); udpexchange.py is one upstream query's
socket; logthrottle.py keeps floods from filling the journal."""
