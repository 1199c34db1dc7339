"""Zone files: YAML on disk -> one immutable, validated `ZoneSet`, and the live holder.

Format (every `*.yaml` / `*.yml` in the zones directory)::

    ttl: 60                       # optional default TTL for the file
    records:
      registry-1.docker.io:
        A: 10.0.0.5               # a value or a list of values
        ttl: 30                   # optional per-name TTL
      "*.apps.ci.example":
        CNAME: ingress.ci.example.

Names are absolute with or without the trailing dot and case-insensitive. Keys of a name
are record types, `ttl` or `health` (a check that withdraws the override while its addresses
fail, see `health`); anything else is rejected so that a typo (or a feature this version
does not have yet) is an error rather than silently ignored.

The package, one concern per module (YAML itself, with its limits, is
`dnsoverride.common.yamlsource`):

- `names`: the form names are compared in, and what makes a name valid;
- `records`: the record types, their values' canonical texts and wire sizes;
- `health`: the `health:` key of a name (parsed spec only; the prober is `dns.health`);
- `model`: `ZoneFile`, `ZoneSet`, `Overrides` (the lookup rules for overridden names and
  wildcards) and the compact form names are kept in;
- `parse`: one file's bytes -> its names, every problem as `file:line: reason`;
- `workers`: the parse of big sets in worker processes;
- `chains`: what a view could not answer (CNAME loops, chains too long or too big);
- `load`: a directory -> a validated `ZoneSet`, re-parsing only changed files;
- `live`: `LiveZones`, the single holder the DNS server reads and `dns.reload` swaps.
"""
