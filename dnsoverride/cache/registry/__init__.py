"""The container-registry side of `dnsoverride cache`: config and its check, routes,
access control, upstream client, manifests, blobs; daemon.py wires them together as a
RegistryService."""
