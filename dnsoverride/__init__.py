"""dnsoverride: a split-horizon override DNS server and a pull-through registry cache."""

__version__ = "0.1.0"
