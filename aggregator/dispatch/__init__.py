"""Dispatch: admitting grid requests, stacking them, and splitting them over the fleet.

``Dispatcher`` (dispatcher.py) is the one entry point, a facade over parts that each own
one piece of state; see docs/ARCHITECTURE.md ("Inside dispatch") for which holds what.
"""

from aggregator.dispatch.dispatcher import SCHEDULE_STEP_S, Dispatcher, StepOutput
from aggregator.dispatch.records import Dispatch, overlaps

__all__ = ["SCHEDULE_STEP_S", "Dispatch", "Dispatcher", "StepOutput", "overlaps"]
