"""Without a grid (no --grid), a request that names a node, firming included, is refused
with a reason: never served fleet-wide, never a crash (issue 11)."""

from __future__ import annotations

import json

import pytest

from aggregator.dispatch import Dispatcher
from broker.models import DispatchRequest
from tests.support.memory_loop import STEP, T0, fleet_and_state


@pytest.mark.parametrize(
    "doc",
    [
        {"request_id": "n-1", "power_kw": -20.0, "duration_s": 600, "node": "carpark"},
        {
            "request_id": "f-1",
            "service": "firming",
            "node": "solar",
            "ramp_kw_per_min": 10.0,
            "duration_s": 600,
        },
    ],
)
def test_a_node_targeted_or_firming_request_is_refused_without_a_grid(
    doc: dict[str, object],
) -> None:
    _, state = fleet_and_state(10)
    d = Dispatcher(control_step_s=STEP)
    answer = d.submit(
        DispatchRequest.model_validate_json(json.dumps(doc)), T0, state.view(T0, 15.0)
    )
    assert answer.status == "rejected"
    assert "--grid" in (answer.reason or "")
    assert d.active() == []  # nothing runs
