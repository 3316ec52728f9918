"""The reconnect backoff: capped, growing, and jittered from the very first delay."""

from __future__ import annotations

import itertools
import statistics

from hypothesis import given
from hypothesis import strategies as st

from broker.link import backoff_delays


@given(
    minimum=st.floats(0.01, 5.0),
    factor=st.floats(1.0, 100.0),
)
def test_every_delay_lies_between_the_minimum_and_the_cap(minimum: float, factor: float) -> None:
    maximum = minimum * factor
    delays = list(itertools.islice(backoff_delays(minimum, maximum), 30))
    assert all(minimum <= d <= maximum for d in delays)
    assert delays[0] <= min(maximum, 2 * minimum)


def test_first_delays_of_many_clients_are_spread_and_later_ones_grow() -> None:
    firsts = [next(backoff_delays(0.2, 10.0)) for _ in range(2000)]
    # A storm of clients that lost the broker together does not come back together.
    assert statistics.pstdev(firsts) > 0.04
    assert len({round(d, 3) for d in firsts}) > 100
    tenth = [list(itertools.islice(backoff_delays(0.2, 10.0), 10))[-1] for _ in range(500)]
    assert statistics.mean(tenth) > 3.0  # grown towards the 10 s cap
