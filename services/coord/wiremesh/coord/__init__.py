"""Coordination server: registration, addresses, network maps, admin API."""
