"""`dnsoverride serve`: the DNS server's stages (listener -> ACL -> view -> overrides ->
cache -> forwarder), one module each; daemon.py wires them together."""
