"""Fixtures of the CLI's tests."""

import pytest


@pytest.fixture
def home(tmp_path):
    """An empty CHAPERONE_HOME of the test's own (the CLI's records)."""
    h = tmp_path / "home"
    h.mkdir()
    return h
