"""Fleet state as numpy columns, one row per vehicle ever seen, in arrival order.

Rows are never removed or reordered, so a row index is a stable handle for a vehicle
for the life of the process (and across restarts, through the state store).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from broker.columns import TelemetryArrays, TelemetryRow
from broker.models import Telemetry
from core.errors import InvalidMessage
from core.physics import Array, Batteries

# Telemetry fields in the order apply_telemetry lays them out, after ts and seq.
_TELEMETRY_COLUMNS = (
    "capacity_kwh",
    "max_charge_kw",
    "max_discharge_kw",
    "charge_efficiency",
    "discharge_efficiency",
    "min_soc",
    "target_soc",
    "soc",
    "power_kw",
    "departure",
)
# meter_kwh: each vehicle's energy through its charger (signed, + in), integrated from
# its reports, each power held from its ts to the next report's.
# no_v2g_until: the owner's "no V2G until departure" hold (an extension), as the time it
# ends: the departure known when it was set (inf: none known, until switched off). A
# deadline rather than a flag, so the hold clears by itself at departure, vectorised.
FLOAT_COLUMNS = (*_TELEMETRY_COLUMNS, "last_ts", "status_ts", "meter_kwh", "no_v2g_until")
BOOL_COLUMNS = ("plugged", "online")
# node: each vehicle's grid node as an index into FleetState.node_names (-1: none said).
INT_COLUMNS = ("last_seq", "node")
NODE_NAMES = "node_names"
"""The snapshot column that carries the node names (one entry per name, not per row)."""

_DEFAULTS: dict[str, float] = {
    "charge_efficiency": 1.0,
    "discharge_efficiency": 1.0,
    "capacity_kwh": 1.0,
    "departure": np.nan,
    "last_ts": -np.inf,
    "status_ts": -np.inf,
    "no_v2g_until": -np.inf,
}


def check_not_ahead(ts: float, now: float, tolerance_s: float) -> None:
    """Refuse a report stamped more than ``tolerance_s`` ahead of the platform clock.

    Folded, it would keep the vehicle looking fresh after it falls silent, and make
    every honest report after it look like a replay until the clock caught up.
    """
    if ts > now + tolerance_s:
        raise InvalidMessage(
            "future",
            f"ts is {ts - now:.1f} s ahead of the platform clock (tolerance {tolerance_s:g} s)",
        )


@dataclass(frozen=True, slots=True)
class FleetView:
    """The vehicles that count right now (plugged in, online, fresh), as dense arrays."""

    rows: NDArray[np.intp]  # their row in FleetState
    batteries: Batteries
    energy: Array
    departure: Array
    power: Array
    ts: Array  # when each vehicle last reported
    meter_kwh: float = 0.0  # the fleet meter: energy through every charger so far
    meters: Array | None = None  # each of these vehicles' own meter, when known
    # Each vehicle's node, an index into FleetState.node_names (-1: none said); None
    # when no vehicle ever named one.
    node: NDArray[np.int64] | None = None
    node_names: tuple[str, ...] = ()

    def __len__(self) -> int:
        return int(self.rows.shape[0])


class FleetState:
    """Latest known state of every vehicle, as columns."""

    def __init__(self, initial_capacity: int = 1024) -> None:
        self.ids: list[str] = []
        self.index: dict[str, int] = {}
        # The grid nodes named so far, in the order first named; the "node" column holds
        # indices into it, so the state never needs the grid file to count a car.
        self.node_names: list[str] = []
        self.node_code: dict[str, int] = {}
        self._cap = max(1, initial_capacity)
        self.cols: dict[str, np.ndarray] = {}
        for name in FLOAT_COLUMNS:
            self.cols[name] = np.full(self._cap, _DEFAULTS.get(name, 0.0))
        for name in BOOL_COLUMNS:
            self.cols[name] = np.zeros(self._cap, dtype=bool)
        for name in INT_COLUMNS:
            self.cols[name] = np.full(self._cap, -1, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.ids)

    def col(self, name: str) -> np.ndarray:
        """The live part of a column (a view: no copy)."""
        return self.cols[name][: len(self.ids)]

    def row_of(self, vehicle_id: str) -> int:
        """The row of ``vehicle_id``, adding a row the first time it is seen."""
        row = self.index.get(vehicle_id)
        if row is None:
            row = len(self.ids)
            if row == self._cap:
                self._grow(self._cap * 2)
            self.ids.append(vehicle_id)
            self.index[vehicle_id] = row
        return row

    def _grow(self, capacity: int) -> None:
        for name, arr in self.cols.items():
            fill = _DEFAULTS.get(name, -1 if name in INT_COLUMNS else 0)
            bigger = np.full(capacity, fill, dtype=arr.dtype)
            bigger[: self._cap] = arr
            self.cols[name] = bigger
        self._cap = capacity

    def rows_of(self, vehicle_ids: Sequence[str]) -> NDArray[np.intp]:
        """The rows of many vehicles at once, adding rows for new ones in the order given."""
        got = list(map(self.index.get, vehicle_ids))  # C-level lookups, no Python per id
        if None in got:  # new vehicles: only their first report pays a Python step
            for k in [k for k, r in enumerate(got) if r is None]:
                got[k] = self.row_of(vehicle_ids[k])
        return np.array(got, dtype=np.intp)

    def apply_telemetry(self, batch: Sequence[Telemetry | TelemetryRow]) -> tuple[int, int]:
        """Fold a batch of telemetry into the columns; returns (applied, stale).

        A message older than what the row holds (by ts, then seq) is stale: replays and
        reordering never move a vehicle back in time.
        """
        if not batch:
            return 0, 0
        return self.apply_arrays(TelemetryArrays.from_telemetry(batch))

    def apply_arrays(self, reports: TelemetryArrays) -> tuple[int, int]:
        """Fold reports given as columns (a bridge's batch, or many decoded messages);
        returns (applied, stale). The same rules as :meth:`apply_telemetry`, vectorised:
        oldest first so the newest write wins, nothing older than a row holds, and no
        report twice."""
        n = len(reports)
        if n == 0:
            return 0, 0
        # Oldest first (by ts, then seq): the newest write wins.
        order = np.lexsort((reports.seq, reports.ts))
        rows = self.rows_of(reports.vehicle_id)[order]
        ts, seq = reports.ts[order], reports.seq[order]
        last_ts = self.cols["last_ts"][rows]
        fresh = (ts > last_ts) | ((ts == last_ts) & (seq > self.cols["last_seq"][rows]))
        # A report repeated within the batch (same vehicle, ts and seq) is a replay too.
        by_row = np.argsort(rows, kind="stable")
        r, t, q = rows[by_row], ts[by_row], seq[by_row]
        repeat = np.zeros(n, dtype=bool)
        repeat[1:] = (r[1:] == r[:-1]) & (t[1:] == t[:-1]) & (q[1:] == q[:-1])
        fresh[by_row[repeat]] = False
        keep = np.flatnonzero(fresh)
        if keep.size:
            r, pick, t = rows[keep], order[keep], ts[keep]
            plugged = reports.plugged_in[pick]
            self._meter(r, t, reports.values["power_kw"][pick], plugged)
            for name in _TELEMETRY_COLUMNS:
                self.cols[name][r] = reports.values[name][pick]
            self.cols["plugged"][r] = plugged
            if reports.node is not None:
                # The latest report that names a node wins (a new one: the car moved); a
                # report that names none leaves the node it had.
                code = self._node_codes([reports.node[k] for k in pick.tolist()])
                named = code >= 0
                self.cols["node"][r[named]] = code[named]
            self.cols["last_ts"][r] = t
            self.cols["last_seq"][r] = seq[keep]
            # Telemetry newer than the last status (a birth) says the vehicle is alive.
            alive = t > self.cols["status_ts"][r]
            self.cols["online"][r[alive]] = True
        return int(keep.size), int(n - keep.size)

    def _node_codes(self, names: list[str | None]) -> NDArray[np.int64]:
        """Each name's index in ``node_names`` (added the first time), -1 for None."""
        codes = self.node_code
        for name in dict.fromkeys(names).keys() - codes.keys():
            if name is not None:
                codes[name] = len(self.node_names)
                self.node_names.append(name)
        get = codes.get
        return np.fromiter((-1 if n is None else get(n, -1) for n in names), np.int64, len(names))

    def _meter(
        self, rows: NDArray[np.intp], ts: Array, power: Array, plugged: NDArray[np.bool_]
    ) -> None:
        """Add to each vehicle's meter the energy since its previous report (rows in ts order,
        a vehicle possibly more than once)."""
        by_row = np.argsort(rows, kind="stable")
        r, t, p, g = rows[by_row], ts[by_row], power[by_row], plugged[by_row]
        first = np.ones(r.shape[0], dtype=bool)
        first[1:] = r[1:] != r[:-1]
        prev_ts = np.where(first, self.cols["last_ts"][r], np.roll(t, 1))
        prev_p = np.where(first, self.cols["power_kw"][r], np.roll(p, 1))
        prev_g = np.where(first, self.cols["plugged"][r], np.roll(g, 1))
        gap = np.where(np.isfinite(prev_ts), np.maximum(t - prev_ts, 0.0), 0.0)
        np.add.at(self.cols["meter_kwh"], r, np.where(prev_g, prev_p * gap / 3600.0, 0.0))

    def meter_reading(self, now: float, stale_after_s: float) -> float:
        """The fleet meter at ``now``: what every charger has passed, in kWh, signed.

        A vehicle is assumed to hold its last reported power for at most
        ``stale_after_s`` after that report, then to be unknown. So a restarted
        aggregator, whose restored rows are all stale at first, reads no less than it
        did before it stopped, and the books it keeps from the meter stay continuous.
        """
        return float(self.meters(now, stale_after_s).sum())

    def meters(self, now: float, stale_after_s: float) -> Array:
        """Each vehicle's meter at ``now`` (a new array), read as ``meter_reading``."""
        c = self.cols
        n = len(self.ids)
        # Rows known by their status alone have no ts: 0 kW x inf would be NaN.
        held = c["plugged"][:n] & c["online"][:n] & np.isfinite(c["last_ts"][:n])
        since = np.where(held, np.clip(now - c["last_ts"][:n], 0.0, stale_after_s), 0.0)
        out: Array = c["meter_kwh"][:n] + np.where(held, c["power_kw"][:n] * since, 0.0) / 3600.0
        return out

    def apply_status(self, vehicle_id: str, online: bool, ts: float) -> None:
        """Record a status (birth or last will) in arrival order.

        A will carries the time its connection was made, older than the telemetry before
        it, so statuses are not ordered by ts: the broker's order is the truth.
        """
        row = self.row_of(vehicle_id)
        self.cols["status_ts"][row] = max(ts, self.cols["status_ts"][row])
        self.cols["online"][row] = online

    def set_no_v2g(self, vehicle_id: str, on: bool, now: float) -> None:
        """Hold a vehicle out of discharge until its departure (``on``), or release it.

        A hold already running is kept as it is (a retained ON heard again after a
        reconnect must not move its end); a new one ends at the departure known now."""
        row = self.row_of(vehicle_id)
        until = self.cols["no_v2g_until"]
        if not on:
            until[row] = -np.inf
        elif until[row] <= now:
            departure = float(self.cols["departure"][row])
            until[row] = departure if np.isfinite(departure) and departure > now else np.inf

    def held(self, now: float) -> NDArray[np.bool_]:
        """Which vehicles are held out of V2G at ``now`` (one per row)."""
        mask: NDArray[np.bool_] = self.col("no_v2g_until") > now
        return mask

    def active_mask(self, now: float, stale_after_s: float) -> NDArray[np.bool_]:
        """Plugged in, online and heard from within ``stale_after_s``: stale counts as unknown."""
        fresh = (now - self.col("last_ts")) <= stale_after_s
        mask: NDArray[np.bool_] = self.col("plugged") & self.col("online") & fresh
        return mask

    def view(self, now: float, stale_after_s: float) -> FleetView:
        """Dense arrays of the active vehicles, ready for the physics."""
        rows = np.flatnonzero(self.active_mask(now, stale_after_s))
        c = self.cols
        cap = c["capacity_kwh"][rows]
        # A held vehicle cannot discharge: every range, envelope and split sees it so.
        held = c["no_v2g_until"][rows] > now
        bat = Batteries(
            capacity_kwh=cap,
            max_charge_kw=c["max_charge_kw"][rows],
            max_discharge_kw=np.where(held, 0.0, c["max_discharge_kw"][rows]),
            charge_efficiency=c["charge_efficiency"][rows],
            discharge_efficiency=c["discharge_efficiency"][rows],
            min_soc=c["min_soc"][rows],
            target_soc=c["target_soc"][rows],
        )
        meters = self.meters(now, stale_after_s)
        return FleetView(
            rows,
            bat,
            c["soc"][rows] * cap,
            c["departure"][rows],
            c["power_kw"][rows],
            c["last_ts"][rows],
            float(meters.sum()),
            meters[rows],
            c["node"][rows] if self.node_names else None,
            tuple(self.node_names),
        )

    def counts(self, now: float, stale_after_s: float) -> tuple[int, int]:
        """(vehicles online and fresh, of which plugged in)."""
        fresh = (now - self.col("last_ts")) <= stale_after_s
        online = self.col("online") & fresh
        return int(online.sum()), int((online & self.col("plugged")).sum())

    # Persistence: plain arrays in, plain arrays out.
    def snapshot(self) -> tuple[list[str], dict[str, np.ndarray]]:
        """The ids and every column; the node names ride along as one more column,
        ``node_names`` (one entry per name, not per row)."""
        columns = {name: self.col(name).copy() for name in self.cols}
        columns[NODE_NAMES] = np.array(self.node_names, dtype=np.str_)
        return list(self.ids), columns

    @classmethod
    def restore(cls, ids: list[str], columns: dict[str, np.ndarray]) -> FleetState:
        state = cls(initial_capacity=max(1024, 2 * len(ids)))
        for vid in ids:
            state.row_of(vid)
        n = len(ids)
        names = columns.get(NODE_NAMES)
        if names is not None:
            state.node_names = [str(x) for x in names.tolist()]
            state.node_code = {x: k for k, x in enumerate(state.node_names)}
        for name, arr in columns.items():
            if name in state.cols and arr.shape[0] == n:
                state.cols[name][:n] = arr
        return state
