"""Package mirrors: the repository metadata parser (more to come with issue 12)."""
