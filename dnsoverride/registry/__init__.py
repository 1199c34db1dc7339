"""`dnsoverride registry`: the pull-through registry cache (routes, upstream client,
manifests, content-addressed blob store); daemon.py wires them together."""
