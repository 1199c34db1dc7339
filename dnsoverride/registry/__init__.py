"""`dnsoverride registry`: the pull-through registry cache (config and its check, routes,
access control, upstream client, manifests, content-addressed blob store); daemon.py wires
them together as a RegistryService."""
