"""Decoded telemetry as the fleet folds it: one report as a plain row, many as numpy columns.

Not the wire contract (that is broker/models.py) but its decoded form, built from validated
models or by the hand decoders of broker/codec.py, which yield the same rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from operator import itemgetter
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import NDArray

from broker.models import TELEMETRY_FLOAT_COLUMNS as _FLOATS
from broker.models import Telemetry, TelemetryBatch


class TelemetryRow(NamedTuple):
    """One vehicle's ``Telemetry``, validated, as the fold takes it: times in epoch seconds,
    ``departure`` NaN when unknown; the floats from ``ts`` on in ``TELEMETRY_FLOAT_COLUMNS`` order.

    One object for the garbage collector to walk per queued report, at each of its full
    collections, where a model is two (itself and its set of fields): with models,
    collections took a quarter of the ingest's CPU time (bench/ingest.py, gc callbacks)."""

    vehicle_id: str
    seq: int
    plugged_in: bool
    ts: float
    soc: float
    capacity_kwh: float
    power_kw: float
    max_charge_kw: float
    max_discharge_kw: float
    charge_efficiency: float
    discharge_efficiency: float
    min_soc: float
    target_soc: float
    departure: float
    node: str | None = None  # extension (the grid): None when the report names none

    @classmethod
    def of(cls, t: Telemetry) -> TelemetryRow:
        """A validated model as plain numbers, as :func:`broker.codec.telemetry_row` decodes
        the same report."""
        return cls(
            t.vehicle_id,
            t.seq,
            t.plugged_in,
            t.ts.timestamp(),
            t.soc,
            t.capacity_kwh,
            t.power_kw,
            t.max_charge_kw,
            t.max_discharge_kw,
            t.charge_efficiency,
            t.discharge_efficiency,
            t.min_soc,
            t.target_soc,
            math.nan if t.departure is None else t.departure.timestamp(),
            t.node,
        )


@dataclass(frozen=True, slots=True)
class TelemetryArrays:
    """Decoded telemetry of many vehicles as numpy columns (one entry per report)."""

    vehicle_id: list[str]
    seq: NDArray[np.int64]
    ts: NDArray[np.float64]  # epoch seconds
    plugged_in: NDArray[np.bool_]
    values: dict[str, NDArray[np.float64]]  # TELEMETRY_FLOAT_COLUMNS; departure NaN if unknown
    # Extension (the grid): each report's node (None: none said); None when no report
    # names one, so a fleet without a grid carries no column for it.
    node: list[str | None] | None = None

    def __len__(self) -> int:
        return len(self.vehicle_id)

    @classmethod
    def from_telemetry(cls, batch: Sequence[Telemetry | TelemetryRow]) -> TelemetryArrays:
        """Columns of validated one-vehicle reports: rows as decoded, models (made rows by
        :meth:`TelemetryRow.of`), or both."""
        return cls.from_rows([t if isinstance(t, tuple) else TelemetryRow.of(t) for t in batch])

    @classmethod
    def from_batch(cls, batch: TelemetryBatch) -> TelemetryArrays:
        """A validated bridge batch as numpy columns, ready to fold into fleet state."""
        return cls(
            vehicle_id=batch.vehicle_id,
            seq=np.array(batch.seq, dtype=np.int64),
            ts=np.array(batch.ts, dtype=np.float64),
            plugged_in=np.array(batch.plugged_in, dtype=np.bool_),
            values={name: np.array(getattr(batch, name), dtype=np.float64) for name in _FLOATS},
            node=batch.node if batch.node is not None and any(batch.node) else None,
        )

    @classmethod
    def from_rows(cls, rows: Sequence[TelemetryRow]) -> TelemetryArrays:
        """Columns of decoded reports, one pass over the rows per column (``zip(*rows)``
        would make an iterator object per row, and wake the garbage collector for them)."""
        n = len(rows)

        def column(k: int, dtype: type[np.generic]) -> NDArray[Any]:
            return np.fromiter(map(itemgetter(k), rows), dtype, n)

        nodes: list[str | None] = [r[14] for r in rows]
        return cls(
            vehicle_id=[r[0] for r in rows],
            seq=column(1, np.int64),
            ts=column(3, np.float64),
            plugged_in=column(2, np.bool_),
            values={name: column(k, np.float64) for k, name in enumerate(_FLOATS, start=4)},
            node=nodes if any(nodes) else None,
        )

    def take(self, index: NDArray[np.intp]) -> TelemetryArrays:
        """The reports at ``index`` only."""
        return TelemetryArrays(
            vehicle_id=list(map(self.vehicle_id.__getitem__, index.tolist())),
            seq=self.seq[index],
            ts=self.ts[index],
            plugged_in=self.plugged_in[index],
            values={k: v[index] for k, v in self.values.items()},
            node=None if self.node is None else list(map(self.node.__getitem__, index.tolist())),
        )

    @classmethod
    def concat(cls, parts: list[TelemetryArrays]) -> TelemetryArrays:
        if len(parts) == 1:
            return parts[0]
        node: list[str | None] | None = None
        if any(p.node is not None for p in parts):
            node = list(chain.from_iterable(p.node or [None] * len(p.vehicle_id) for p in parts))
        return cls(
            node=node,
            vehicle_id=list(chain.from_iterable(p.vehicle_id for p in parts)),
            seq=np.concatenate([p.seq for p in parts]),
            ts=np.concatenate([p.ts for p in parts]),
            plugged_in=np.concatenate([p.plugged_in for p in parts]),
            values={k: np.concatenate([p.values[k] for p in parts]) for k in _FLOATS},
        )
