"""The HTTP cache the DNS overrides point at (placeholder until the restructure lands)."""
