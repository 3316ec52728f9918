"""Durations as people write them, read one way by scenario files and the command line."""

from __future__ import annotations

import re

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|min|h|d)?\s*$")
_UNITS = {"s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86_400.0}
DURATION_EXAMPLES = "900, 900s, 15m, 4h or 1d"


def seconds(text: str) -> float:
    """'900', '900s', '15m', '4h', '1d' -> seconds; ValueError names the accepted forms."""
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a duration; use e.g. {DURATION_EXAMPLES}")
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]
