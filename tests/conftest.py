"""Shared pytest configuration. Component fixtures live beside the tests that use them."""
