"""Every hand-written decoder and encoder of the wire models, in one place.

Where a pydantic model per message costs more than the work around it (the ingest of
per-vehicle telemetry, the setpoints of a step, a simulated fleet's telemetry), these read
or write the models' JSON directly. The decoder and the setpoint encoders check what their
model checks, with the model's own bounds (the constants of broker/models.py and the id
pattern of broker/topics.py, never a copy); the telemetry encoders take a simulated
fleet's valid columns. tests/unit/test_codec.py holds each to its model: the decoder
never accepts what the model refuses and yields the model's values; an encoder's output
parses back through the model to the values it was given, and a setpoint encoder raises
exactly where the model would refuse.

The MQTT packets are framed by the ``mqtt5`` codec (broker/mqtt5link.py); the decoded forms
(rows, numpy columns) are broker/columns.py.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from operator import itemgetter

import numpy as np
import orjson
from numpy.typing import NDArray

from broker.columns import TelemetryArrays, TelemetryRow
from broker.models import (
    EPOCH_MAX_S,
    EPOCH_MIN_S,
    MAX_BATCH_VEHICLES,
    MAX_CAPACITY_KWH,
    MAX_VEHICLE_KW,
    SEQ_LIMIT,
    TELEMETRY_FLOAT_COLUMNS,
    FcrDroop,
    from_epoch,
)
from broker.topics import ID_PATTERN, check_id

_FLOATS = TELEMETRY_FLOAT_COLUMNS


# -- Telemetry in: the per-vehicle fast path --------------------------------------------
#
# ``Telemetry.model_validate_json`` costs ~4-7 µs a message, over a third of it in the
# Python validators of the id and the times: half the aggregator's ingest time (py-spy,
# bench/ingest.py). :func:`telemetry_row` decodes the common form of a report with
# orjson and plain comparisons instead, and answers None for anything it cannot vouch for:
# the model then decides, so a refused message is refused by the model, with its reason
# and detail, exactly as before. What the fast path accepts, the model accepts with the
# same values (tests/unit/test_codec.py and test_telemetry_decode.py fuzz the two).

_required = itemgetter(
    "vehicle_id", "seq", "ts", "plugged_in", *(k for k in _FLOATS if k != "departure")
)
_NUMBER = frozenset({float, int})  # a strict float takes a JSON integer, never a bool
_id_match = re.compile(ID_PATTERN).fullmatch  # check_id's pattern
# The times the fast path reads: UTC, whole seconds or up to microseconds. Other forms
# (other offsets, a space for the T, more digits, epoch strings) are the model's to judge.
_utc_text = re.compile(
    r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,6})?(?:Z|\+00:00)", re.ASCII
).fullmatch
_from_iso = datetime.fromisoformat
_loads = orjson.loads
_row = TelemetryRow._make
_ABSENT = object()
# Quotes in the text of a report without extra fields: each key and string value is two
# quotes, 13 keys and 2 strings (vehicle_id, ts) always; departure and node (an extension)
# add a key each when present, and a string each when not null.
_QUOTES_BASE = 2 * (13 + 2)


def _utc_epoch(text: object) -> float | None:
    if type(text) is not str or _utc_text(text) is None:
        return None
    try:
        return _from_iso(text).timestamp()
    except ValueError:  # no such day or time (Feb 30, 24:00, second 60): the model's call
        return None


def telemetry_row(payload: bytes, vehicle_id: str) -> TelemetryRow | None:
    """``payload`` decoded, if it is a valid ``Telemetry`` of ``vehicle_id`` in the common
    form (the contract's fields only, UTC times as the platform writes them); None
    otherwise, and then ``Telemetry.model_validate_json`` must decide.

    Never accepts what the model refuses, and yields the model's values: the same range,
    type (strict: no strings or bools for numbers, an integral seq) and id checks, behind
    a JSON parser (orjson) as strict as the model's. Extra fields and repeated keys go to
    the model, so no part of the text that the fast path skips can hide malformed JSON.
    """
    try:
        doc = _loads(payload)
        departure = doc.get("departure", _ABSENT)
        node = doc.get("node", _ABSENT)
        vid, seq, ts, plugged, soc, cap, power, mch, mdis, ech, edis, low, tgt = _required(doc)
    except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError):  # not an object
        return None
    # Every key and string value is two quotes in the text (more if it escapes one), and
    # orjson checked the grammar: with the count right, each key is there once, and no
    # value anywhere is nested.
    keys, quotes = 13, _QUOTES_BASE
    leave: float | None = math.nan
    if departure is not _ABSENT:
        keys, quotes = keys + 1, quotes + (2 if departure is None else 4)
        if departure is not None:
            leave = _utc_epoch(departure)
    if node is _ABSENT:
        node = None
    else:
        keys, quotes = keys + 1, quotes + (2 if node is None else 4)
        if node is not None and (type(node) is not str or _id_match(node) is None):
            return None
    if len(doc) != keys or payload.count(b'"') != quotes:
        return None
    if vid != vehicle_id or _id_match(vid) is None:
        return None
    if type(seq) is not int or not 0 <= seq < SEQ_LIMIT or type(plugged) is not bool:
        return None
    if not (
        type(soc) is float
        and type(cap) is float
        and type(power) is float
        and type(mch) is float
        and type(mdis) is float
        and type(ech) is float
        and type(edis) is float
        and type(low) is float
        and type(tgt) is float
    ):  # JSON integers in float fields: the model takes them, as floats; nothing else
        if (
            not {type(soc), type(cap), type(power), type(mch), type(mdis)}.union(
                (type(ech), type(edis), type(low), type(tgt))
            )
            <= _NUMBER
        ):
            return None
        soc, cap, power, mch, mdis = float(soc), float(cap), float(power), float(mch), float(mdis)
        ech, edis, low, tgt = float(ech), float(edis), float(low), float(tgt)
    if not (
        0.0 <= soc <= 1.0
        and 0.0 < cap <= MAX_CAPACITY_KWH
        and -MAX_VEHICLE_KW <= power <= MAX_VEHICLE_KW
        and 0.0 <= mch <= MAX_VEHICLE_KW
        and 0.0 <= mdis <= MAX_VEHICLE_KW
        and 0.0 < ech <= 1.0
        and 0.0 < edis <= 1.0
        and 0.0 <= low <= 1.0
        and 0.0 <= tgt <= 1.0
    ):
        return None
    at = _utc_epoch(ts)
    if at is None or leave is None:
        return None
    return _row(
        (vid, seq, plugged, at, soc, cap, power, mch, mdis, ech, edis, low, tgt, leave, node)
    )


# -- Telemetry out: what simulated vehicles and bridges send -----------------------------
# Formatted directly rather than through the models: this runs for every vehicle every
# interval. Times as ISO 8601 with microseconds and 'Z'; soc to 6 decimals and power_kw to
# 4 (finer is noise); the other numbers as they are.


def _iso_us(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _stamps(ts: NDArray[np.float64]) -> list[str]:
    """Each time as text. Most vehicles share one clock: it is formatted once, and so is
    each other distinct time, however many they are."""
    n = ts.shape[0]
    if not n:
        return []
    odd = np.flatnonzero(ts != ts[0])
    if odd.size <= n // 2:
        out = [_iso_us(float(ts[0]))] * n
        for i, t in zip(odd.tolist(), ts[odd].tolist(), strict=True):
            out[i] = _iso_us(t)
        return out
    moments, inverse = np.unique(ts, return_inverse=True)
    return list(np.array([_iso_us(t) for t in moments.tolist()], dtype=object)[inverse])


def telemetry_payloads(reports: TelemetryArrays) -> list[bytes]:
    """One ``Telemetry`` JSON payload per report, in order (``departure`` null where NaN).

    The reports must be valid (within the model's bounds): they come from a simulated
    fleet, and tests/unit/test_codec.py holds the output to the model.
    """
    ts = _stamps(reports.ts)
    v = reports.values
    soc, cap, power = v["soc"].tolist(), v["capacity_kwh"].tolist(), v["power_kw"].tolist()
    mch, mdis = v["max_charge_kw"].tolist(), v["max_discharge_kw"].tolist()
    ech, edis = v["charge_efficiency"].tolist(), v["discharge_efficiency"].tolist()
    mins, tgt = v["min_soc"].tolist(), v["target_soc"].tolist()
    departure = v["departure"].tolist()
    plugged = reports.plugged_in.tolist()
    seq = reports.seq.tolist()
    # Extension (the grid): ',"node":"x"' after departure where a report names one.
    node = (
        [""] * len(reports)
        if reports.node is None
        else ["" if n is None else f',"node":"{n}"' for n in reports.node]
    )
    out = []
    for i, vid in enumerate(reports.vehicle_id):
        d = departure[i]
        dep = "null" if d != d else f'"{_iso_us(d)}"'  # NaN: unknown
        out.append(
            (
                f'{{"vehicle_id":"{vid}","seq":{seq[i]},"ts":"{ts[i]}",'
                f'"plugged_in":{"true" if plugged[i] else "false"},"soc":{soc[i]:.6f},'
                f'"capacity_kwh":{cap[i]!r},"power_kw":{power[i]:.4f},'
                f'"max_charge_kw":{mch[i]!r},"max_discharge_kw":{mdis[i]!r},'
                f'"charge_efficiency":{ech[i]!r},"discharge_efficiency":{edis[i]!r},'
                f'"min_soc":{mins[i]!r},"target_soc":{tgt[i]!r},"departure":{dep}{node[i]}}}'
            ).encode()
        )
    return out


def telemetry_batch_payloads(
    bridge_id: str,
    sent_at: float,
    reports: TelemetryArrays,
    max_vehicles: int = MAX_BATCH_VEHICLES,
) -> list[bytes]:
    """The reports as ``TelemetryBatch`` messages of ``bridge_id`` sent at epoch
    ``sent_at``, split at ``max_vehicles`` (one message unless the bridge carries more);
    the same values, at the same precision, as :func:`telemetry_payloads`."""
    stamp = _iso_us(sent_at)
    out = []
    v = reports.values
    for k in range(0, len(reports), max_vehicles):
        part = slice(k, k + max_vehicles)  # views: no column is copied
        dep = v["departure"][part]
        departure: list[float | None] = dep.tolist()
        for i in np.flatnonzero(np.isnan(dep)).tolist():
            departure[i] = None
        columns = {
            "bridge_id": bridge_id,
            "sent_at": stamp,
            "vehicle_id": reports.vehicle_id[part],
            "seq": reports.seq[part].tolist(),
            "ts": np.round(reports.ts[part], 6).tolist(),
            "plugged_in": reports.plugged_in[part].tolist(),
            "soc": np.round(v["soc"][part], 6).tolist(),
            "capacity_kwh": v["capacity_kwh"][part].tolist(),
            "power_kw": np.round(v["power_kw"][part], 4).tolist(),
            "max_charge_kw": v["max_charge_kw"][part].tolist(),
            "max_discharge_kw": v["max_discharge_kw"][part].tolist(),
            "charge_efficiency": v["charge_efficiency"][part].tolist(),
            "discharge_efficiency": v["discharge_efficiency"][part].tolist(),
            "min_soc": v["min_soc"][part].tolist(),
            "target_soc": v["target_soc"][part].tolist(),
            "departure": departure,
        }
        if reports.node is not None:  # extension (the grid)
            columns["node"] = reports.node[part]
        out.append(json.dumps(columns, separators=(",", ":")).encode())
    return out


# -- Setpoints out -----------------------------------------------------------------------
# A pydantic model per vehicle cost ~15 µs to build and serialise, more than the
# allocation itself: the setpoints of a step are formatted directly, and checked as the
# models check them, so that nothing goes out that a vehicle or bridge would refuse.


def utc_stamp(moment: datetime) -> str:
    """A UTC datetime as pydantic writes it: ISO 8601, 'Z', microseconds only if any."""
    return moment.isoformat().replace("+00:00", "Z")


def setpoint_payloads(
    vehicle_ids: Sequence[str],
    request_id: str,
    power_kw: Sequence[float] | NDArray[np.float64],
    valid_until: NDArray[np.float64],
    issued_at: datetime,
) -> list[bytes]:
    """``Setpoint(vehicle_id, request_id, power_kw=round(p, 3), issued_at,
    valid_until=from_epoch(u)).to_json()`` for every vehicle, formatted directly.

    Same fields, order and formats as the model's JSON (floats by ``repr``, which for a
    value rounded to 3 decimals within +-MAX_VEHICLE_KW is the shortest form pydantic writes
    too; times as ISO 8601 with 'Z'). Checked like the model: the request id, finite power
    within +-MAX_VEHICLE_KW, each ``valid_until`` after ``issued_at`` (ValueError otherwise). The
    vehicle ids are fleet-state ids, validated by the model when the vehicle reported.
    """
    power = [round(p, 3) for p in np.asarray(power_kw, dtype=np.float64).tolist()]
    until = np.asarray(valid_until, dtype=np.float64)
    if not (len(vehicle_ids) == len(power) == until.shape[0]):
        raise ValueError("vehicle_ids, power_kw and valid_until must be as long as each other")
    if not power:  # no setpoint (a step without a request has request_id "")
        return []
    check_id(request_id, "request_id")
    arr = np.asarray(power)
    if not np.isfinite(arr).all() or float(np.abs(arr).max()) > MAX_VEHICLE_KW:
        raise ValueError(f"setpoint power must be finite and within +-{MAX_VEHICLE_KW:g} kW")
    issued = issued_at.astimezone(UTC)
    values, inverse = np.unique(until, return_inverse=True)
    stamps = []
    for u in values.tolist():
        moment = from_epoch(u)
        if not moment > issued:
            raise ValueError(f"valid_until {utc_stamp(moment)} must be after issued_at")
        stamps.append(utc_stamp(moment))
    head = '{"vehicle_id":"'
    middle = f'","request_id":"{request_id}","power_kw":'
    tail = f',"issued_at":"{utc_stamp(issued)}","valid_until":"'
    if len(stamps) == 1:
        end = f'{tail}{stamps[0]}"}}'
        return [f"{head}{v}{middle}{p!r}{end}".encode() for v, p in zip(vehicle_ids, power)]  # noqa: B905 - lengths checked above
    return [
        f'{head}{v}{middle}{p!r}{tail}{stamps[j]}"}}'.encode()
        for v, p, j in zip(vehicle_ids, power, inverse.tolist())  # noqa: B905 - lengths checked above
    ]


def setpoint_batch_payload(
    bridge_id: str,
    request_id: str,
    issued_at: datetime,
    vehicle_ids: list[str],
    power_kw: NDArray[np.float64],
    valid_until: NDArray[np.float64],
    fcr: FcrDroop | None = None,
    fcr_capacity_kw: NDArray[np.float64] | None = None,
) -> bytes:
    """``SetpointBatch(bridge_id, request_id, issued_at, vehicle_ids,
    power_kw=np.round(power_kw, 3), valid_until)`` as JSON, formatted directly: validating
    our own output vehicle by vehicle would cost more than the allocation. With ``fcr``
    and ``fcr_capacity_kw`` (both or neither), the FCR extension too (shares rounded to
    3 decimals); without them the bytes are as before it.

    Checked like the model (ValueError otherwise): the ids, 1 to MAX_BATCH_VEHICLES
    vehicles, columns of one length, finite power within +-MAX_VEHICLE_KW, every
    ``valid_until`` after ``issued_at`` and within the model's epoch range.
    """
    check_id(bridge_id, "bridge_id")
    check_id(request_id, "request_id")
    n = len(vehicle_ids)
    if not 1 <= n <= MAX_BATCH_VEHICLES:
        raise ValueError(f"a setpoint batch carries 1..{MAX_BATCH_VEHICLES} vehicles, not {n}")
    with np.errstate(over="ignore"):  # a power past 1e305 rounds to inf, refused below
        power = np.round(np.asarray(power_kw, dtype=np.float64), 3)
    until = np.asarray(valid_until, dtype=np.float64)
    if not power.shape[0] == until.shape[0] == n:
        raise ValueError("vehicle_ids, power_kw and valid_until must be as long as each other")
    if not float(np.abs(power).max()) <= MAX_VEHICLE_KW:  # NaN fails it too
        raise ValueError(f"setpoint power must be finite and within +-{MAX_VEHICLE_KW:g} kW")
    issued = issued_at.astimezone(UTC)
    first, last = float(until.min()), float(until.max())
    if not EPOCH_MIN_S < first <= last < EPOCH_MAX_S:  # NaN fails it too
        raise ValueError(f"valid_until must be epoch seconds in ({EPOCH_MIN_S:g}, {EPOCH_MAX_S:g})")
    if first <= issued.timestamp():
        raise ValueError("every valid_until must be after issued_at")
    body: dict[str, object] = {
        "bridge_id": bridge_id,
        "request_id": request_id,
        "issued_at": utc_stamp(issued),
        "vehicle_id": vehicle_ids,
        "power_kw": power.tolist(),
        "valid_until": until.tolist(),
    }
    if (fcr is None) != (fcr_capacity_kw is None):
        raise ValueError("fcr and fcr_capacity_kw go together: give both or neither")
    if fcr is not None and fcr_capacity_kw is not None:
        with np.errstate(over="ignore"):
            share = np.round(np.asarray(fcr_capacity_kw, dtype=np.float64), 3)
        if share.shape[0] != n:
            raise ValueError("fcr_capacity_kw must be as long as vehicle_ids")
        if not 0.0 <= float(share.min()) <= float(share.max()) <= MAX_VEHICLE_KW:
            raise ValueError(f"fcr_capacity_kw must be finite and within 0..{MAX_VEHICLE_KW:g} kW")
        body["fcr"] = fcr.model_dump(mode="json")
        body["fcr_capacity_kw"] = (share + 0.0).tolist()  # + 0.0: no "-0.0" on the wire
    return json.dumps(body, separators=(",", ":")).encode()
