"""The package-repository side of `dnsoverride cache`: the CentOS mirrorlist responder
(mirrorlist.py), the metalink responder for dnf (metalink.py), and the pull-through
yum/dnf repository cache (repomd.py, repos.py); config.py reads the `packages:` section."""
