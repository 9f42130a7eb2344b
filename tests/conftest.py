"""Shared pytest configuration. Component fixtures live beside the tests that use them."""

# Real NATS / PostgreSQL / keys+coord fixtures, usable from every test directory.
pytest_plugins = ["fixtures_services"]
