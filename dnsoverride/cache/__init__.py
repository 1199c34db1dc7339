"""`dnsoverride cache`: the one HTTP cache the DNS overrides point at.

It serves, by Host (and TLS SNI), the container registry API (registry/) and the package
repository side (packages/: mirrorlist and metalink responders, the pull-through
repository cache), over one content-addressed store with one size budget (store.py),
one single-flight download machinery (fetch.py), one config file with a section per
kind (config.py) and one admin listener (daemon.py).
"""
