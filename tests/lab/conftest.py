"""Fixtures for the network lab tests (need root: network namespaces and nftables)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from wiremesh.lab import Lab


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab() as the_lab:
        yield the_lab
