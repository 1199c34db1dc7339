"""Fixture plugins shared by several test modules."""

pytest_plugins = ("tests.registry_fixtures", "tests.yum_fixtures")
