"""The type of the ``figure`` fixture (tests/conftest.py), for tests that record a figure."""

from __future__ import annotations

from collections.abc import Callable

# figure("what", value, "unit", limit="< 1 s"): one measured figure of the running test.
Recorder = Callable[..., None]
