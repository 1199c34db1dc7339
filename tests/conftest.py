"""Fixture plugins shared by several test modules."""

pytest_plugins = ("tests.support.registry_fixtures",)
