"""What tests share: real peers (`peers`, `registry_peers`), lying peers (`LyingUpstream`
in `peers`, `registry_liar`), load generators (`dns_load`), certificates and network
namespaces, the registry and systemd fixtures (pytest plugins, `registry_fixtures` and
`systemd`), and the small helpers below. Test modules import from here, as
`from tests.support.X import Y`, and never from one another."""
