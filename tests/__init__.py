"""The test suite. Its directories mirror the package: dns/ (zones/ within), cache/ (the
registry cache), common/, cli/ (commands and packaging end to end); support/ holds every
shared peer, helper and fixture plugin (see CONTRIBUTING.md, "Tests")."""
