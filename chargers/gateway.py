"""The OCPP gateway: charging sessions in, setpoints out, as a bridge of DESIGN.md.

Every EVSE with an EV session is a vehicle of the fleet. The gateway reports them as one
``TelemetryBatch`` per telemetry interval on ``{prefix}/bridges/{bridge_id}/telemetry``
(and at once, for the sessions a station's message changed), and takes their setpoints
as ``SetpointBatch`` messages on ``{prefix}/bridges/{bridge_id}/setpoints``, turning each
into a ``SetChargingProfile`` (chargers/profiles.py). Allocation stays in the aggregator.

- A session ends (TransactionEvent Ended, EV departed, connector Available, a reboot):
  its vehicle is reported unplugged once and dropped.
- A station's websocket drops: its vehicles are no longer reported, so the aggregator
  counts them out within its stale bound; they come back with the same ids when the
  station reconnects, and the gateway asks for the rest with TriggerMessage.
- Frequency containment (the FCR extension of SetpointBatch): a session that can discharge
  gets a LocalFrequency curve around its operating point (droop at the charger); the
  others the central setpoint.
- A rejected SetChargingProfile is logged and counted; the EVSE keeps drawing what it
  draws, and the aggregator's follow-ratio learning treats it as a non-follower.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import ssl
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
import structlog
from pydantic import ValidationError

from broker.clientid import client_id
from broker.link import MqttLink, Outgoing
from broker.models import MAX_BATCH_VEHICLES, SetpointBatch, TelemetryBatch, from_epoch, to_epoch
from broker.settings import Settings
from chargers.auth import StationStore
from chargers.csms import Csms, Json, Station, listening_port
from chargers.ownership import Ownership
from chargers.profiles import Fcr, Target, negative_values, set_charging_profile
from chargers.sessions import (
    Assumptions,
    EvseSession,
    apply_charging_needs,
    apply_meter_values,
    telemetry_fields,
    vehicle_id_of,
)
from core.clock import Clock
from core.errors import TransportError

Key = tuple[str, int]  # (station id, evse id)
# Setpoint received -> SetChargingProfile answered, s: the metrics histogram's buckets.
LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
FLUSH_WALL_S = 0.05  # changed sessions go out this soon after the message that changed them
TRIGGER_TIMEOUT_S = 5.0


@dataclass(slots=True)
class Want:
    """The setpoint in force for a session (None: its baseline)."""

    power_kw: float
    until: float
    issued: float
    heard_at: float  # time.monotonic() when the gateway received it
    # Frequency containment (SetpointBatch's FCR extension): the session's share, and
    # its operating point (power_kw without the activation it was computed at).
    fcr: Fcr | None = None
    base_kw: float = 0.0


@dataclass(frozen=True, slots=True)
class Sent:
    """What the station was last told: a setpoint until a time, or the baseline (None)."""

    power_kw: float | None
    until: float | None
    can_discharge: bool
    fcr: Fcr | None = None  # LocalFrequency around power_kw (None: a setpoint or a limit)


class Gateway:
    """Runs the CSMS and its MQTT bridge until cancelled."""

    def __init__(
        self,
        *,
        settings: Settings,
        clock: Clock,
        stations: StationStore,
        bridge_id: str,
        open_mode: bool = False,
        heartbeat_s: int = 60,
        ownership: Ownership | None = None,
        assumptions: Assumptions | None = None,
        logger: structlog.typing.FilteringBoundLogger | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.bridge_id = bridge_id
        self.assume = assumptions or Assumptions()
        self.log = logger or structlog.get_logger("ocpp")
        self.topics = settings.topics
        self.csms = Csms(
            handlers=self,
            stations=stations,
            open_mode=open_mode,
            heartbeat_s=heartbeat_s,
            ping_s=min(20.0, settings.stale_s / 3.0),
            logger=self.log,
        )
        self.open_mode = open_mode
        self.ownership = ownership
        self._dropped_claims: list[tuple[str, str]] = []
        self.link = MqttLink(
            settings=settings,
            client_id=client_id(settings.topic_prefix, bridge_id),
            handler=self.on_mqtt,
            subscriptions=[(self.topics.bridge_setpoints(bridge_id), 1)],
            logger=self.log,
        )
        self.sessions: dict[Key, EvseSession] = {}
        self.by_vehicle: dict[str, Key] = {}
        self.evses: dict[str, set[int]] = {}  # station id -> its EVSEs with a session
        self.want: dict[Key, Want] = {}
        self.sent: dict[Key, Sent] = {}
        self.ended: list[EvseSession] = []  # to report unplugged once, then forget
        self.stations: dict[str, Station] = {}
        self.units: dict[str, str] = {}  # a station found to take limits in A only: "A"
        self.counts: Counter[str] = Counter()
        # SetChargingProfile: the CALL's round trip, and setpoint received -> answered.
        self.call_rtt_s: deque[float] = deque(maxlen=100_000)
        self.setpoint_latency_s: deque[float] = deque(maxlen=100_000)
        self.latency = Histogram(LATENCY_BUCKETS_S)  # the same, since the start
        self._dirty: set[Key] = set()
        self._wake = asyncio.Event()
        self._sync_posted: set[str] = set()
        self.port = 0
        self.listening = asyncio.Event()

    # -- running -------------------------------------------------------------------------

    async def run(self, host: str, port: int, *, tls: ssl.SSLContext | None = None) -> None:
        async with self.csms.server(host, port, tls=tls) as server:
            self.port = listening_port(server)
            self.log.info(
                "ocpp_gateway_listening",
                url=f"{'wss' if tls else 'ws'}://{host}:{self.port}/{{station_id}}",
                bridge_id=self.bridge_id,
                client_id=self.link.client_id,
                topic_prefix=self.settings.topic_prefix,
                security_profile=2 if tls else 1,
            )
            if self.open_mode:
                self.log.warning(
                    "ocpp_open_mode",
                    hint="stations that are not provisioned are accepted without a password;"
                    " for a lab only (provisioned stations still need theirs)",
                )
            self.listening.set()
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.link.run(), name="ocpp-mqtt")
                tg.create_task(self._report_loop(), name="ocpp-report")
                tg.create_task(self._flush_loop(), name="ocpp-flush")
                tg.create_task(self._summary_loop(), name="ocpp-summary")
                if self.ownership is not None:
                    tg.create_task(self._ownership_loop(self.ownership), name="ocpp-owner")

    # -- the stations' side (chargers.csms.Handlers) --------------------------------------

    def connected(self, station: Station) -> None:
        self.stations[station.id] = station
        if self.ownership is not None:
            station.post(lambda: self._claim(station))
        known = sorted(self.evses.get(station.id, ()))
        if known:  # back from a drop: its vehicles return; ask for what we missed
            self._dirty.update((station.id, e) for e in known)
            self._wake.set()
            station.post(lambda: self._trigger(station, known))
            self._post_sync(station)

    def disconnected(self, station: Station) -> None:
        if self.stations.get(station.id) is station:
            del self.stations[station.id]
            if self.ownership is not None:
                value = self.ownership.drop(station.id)
                if value is not None:
                    self._dropped_claims.append((station.id, value))
        self._sync_posted.discard(station.id)
        # Its vehicles stop being reported: the fleet counts them out at its stale bound.
        # What the station was told is unknown from now on (it may drop it offline).
        for evse in self.evses.get(station.id, ()):
            self.sent.pop((station.id, evse), None)

    def on_call(self, station: Station, action: str, payload: Json) -> Json | None:
        if action == "BootNotification":
            for evse in list(self.evses.get(station.id, ())):
                self._end((station.id, evse), "station rebooted")
        elif action == "StatusNotification":
            if payload["connectorStatus"] == "Available":
                self._end((station.id, payload["evseId"]), "EV disconnected")
        elif action == "TransactionEvent":
            self._on_transaction(station, payload)
        elif action == "MeterValues":
            key = (station.id, payload["evseId"])
            if key in self.sessions:
                apply_meter_values(self.sessions[key], payload["meterValue"], self.assume)
                self._touch(key)
        elif action == "NotifyEVChargingNeeds":
            key = (station.id, payload["evseId"])
            s = self._session(station, key, None, None)
            apply_charging_needs(s, payload["chargingNeeds"], self.assume)
            self._touch(key)
            self._maybe_ask_bpt(station, key)
            return {"status": "Accepted"}
        elif action == "NotifyEVChargingSchedule":
            return {"status": "Accepted"}
        return None

    def _on_transaction(self, station: Station, p: Json) -> None:
        tx = p["transactionInfo"]["transactionId"]
        evse = (p.get("evse") or {}).get("id")
        if evse is None:  # only the first event of a transaction must name the EVSE
            evse = next(
                (
                    e
                    for e in self.evses.get(station.id, ())
                    if self.sessions[(station.id, e)].transaction_id == tx
                ),
                None,
            )
            if evse is None:
                return
        key = (station.id, int(evse))
        if p["eventType"] == "Ended" or p.get("triggerReason") == "EVDeparted":
            if key in self.sessions:
                apply_meter_values(self.sessions[key], p.get("meterValue") or [], self.assume)
            self._end(key, "transaction ended")
            return
        s = self._session(station, key, tx, p.get("idToken"))
        apply_meter_values(s, p.get("meterValue") or [], self.assume)
        self._touch(key)
        self._maybe_ask_bpt(station, key)

    def _session(
        self, station: Station, key: Key, tx: str | None, id_token: Json | None
    ) -> EvseSession:
        """The session of ``key``, created (or re-identified, when an idToken names the
        car) as needed; a car that shows up here is no longer anywhere else."""
        vid = vehicle_id_of(station.id, key[1], id_token)
        s = self.sessions.get(key)
        if s is not None and (id_token is None or s.vehicle_id == vid):
            if tx is not None:
                s.transaction_id = tx
            return s
        if s is not None:  # the token named the car after the session began
            self.ended.append(_unplugged_copy(s))
            self.by_vehicle.pop(s.vehicle_id, None)
            s.vehicle_id = vid
        else:
            s = EvseSession(
                station_id=station.id, evse_id=key[1], version=station.version, vehicle_id=vid
            )
            self.sessions[key] = s
            self.evses.setdefault(key[0], set()).add(key[1])
            self.log.info("ocpp_vehicle_joined", station=station.id, evse=key[1], vehicle=vid)
        if tx is not None:
            s.transaction_id = tx
        elsewhere = self.by_vehicle.get(vid)
        if elsewhere is not None and elsewhere != key:
            self._end(elsewhere, "the car plugged in elsewhere")
        self.by_vehicle[vid] = key
        return s

    def _end(self, key: Key, why: str) -> None:
        s = self.sessions.get(key)
        self._forget(key)
        if s is None:
            return
        s.plugged = False
        self.ended.append(s)
        self._wake.set()
        self.log.info(
            "ocpp_vehicle_left", station=key[0], evse=key[1], vehicle=s.vehicle_id, reason=why
        )

    def _touch(self, key: Key) -> None:
        self._dirty.add(key)
        self._wake.set()

    # -- which process holds which station (several gateways, one fleet) ------------------

    async def _claim(self, station: Station) -> None:
        assert self.ownership is not None
        value = await self.ownership.claim(station.id)
        self.log.info("ocpp_station_claimed", station=station.id, owner=value)

    async def _ownership_loop(self, ownership: Ownership) -> None:
        """Renew this process's claims; a station another process has claimed since is
        dropped here: its socket closed, its sessions forgotten (not ended: they go on
        at the other process, under the same vehicle ids)."""
        while True:
            await asyncio.sleep(ownership.ttl_s / 3.0)
            dropped, self._dropped_claims = self._dropped_claims, []
            await ownership.release(dropped)
            for sid in await ownership.renew():
                self.counts["stations_taken_over"] += 1
                self.log.warning("ocpp_station_taken_over", station=sid)
                for evse in list(self.evses.get(sid, ())):
                    self._forget((sid, evse))
                station = self.stations.pop(sid, None)
                if station is not None:
                    await station.close("taken over by another gateway process")

    def _forget(self, key: Key) -> None:
        s = self.sessions.pop(key, None)
        self.want.pop(key, None)
        self.sent.pop(key, None)
        self._dirty.discard(key)
        if s is not None:
            self.evses[key[0]].discard(key[1])
            if not self.evses[key[0]]:
                del self.evses[key[0]]
            if self.by_vehicle.get(s.vehicle_id) == key:
                del self.by_vehicle[s.vehicle_id]

    # -- calls to the stations -------------------------------------------------------------

    def _maybe_ask_bpt(self, station: Station, key: Key) -> None:
        s = self.sessions.get(key)
        if (
            s is None
            or station.version != "2.1"
            or not s.bpt_modes
            or s.bpt_asked
            or s.transaction_id is None
        ):
            return
        s.bpt_asked = True
        station.post(lambda: self._ask_bpt(station, key))

    async def _ask_bpt(self, station: Station, key: Key) -> None:
        s = self.sessions.get(key)
        if s is None or s.transaction_id is None:
            return
        answer = await station.call_raw(
            "NotifyAllowedEnergyTransfer",
            {"transactionId": s.transaction_id, "allowedEnergyTransfer": list(s.bpt_modes)},
        )
        accepted = answer.get("status") == "Accepted"
        s.bpt_allowed = accepted
        self.counts["bpt_accepted" if accepted else "bpt_rejected"] += 1
        self.log.info(
            "ocpp_bpt_answer",
            station=station.id,
            evse=key[1],
            vehicle=s.vehicle_id,
            modes=",".join(s.bpt_modes),
            status=answer.get("status"),
        )
        self._touch(key)
        if key in self.want:
            self._post_sync(station)

    async def _trigger(self, station: Station, evses: list[int]) -> None:
        for evse in evses:
            for what in ("TransactionEvent", "MeterValues"):
                try:
                    await station.call_raw(
                        "TriggerMessage",
                        {"requestedMessage": what, "evse": {"id": evse}},
                        timeout=TRIGGER_TIMEOUT_S,
                    )
                except TimeoutError:
                    self.counts["trigger_unanswered"] += 1

    def _post_sync(self, station: Station) -> None:
        if station.id not in self._sync_posted:
            self._sync_posted.add(station.id)
            station.post(lambda: self._sync(station))

    async def _sync(self, station: Station) -> None:
        """Bring every session of ``station`` to the profile its setpoint asks for."""
        self._sync_posted.discard(station.id)
        now = self.clock.now()
        for evse in sorted(self.evses.get(station.id, ())):
            key = (station.id, evse)
            s = self.sessions.get(key)
            if s is None:
                continue
            w = self.want.get(key)
            last = self.sent.get(key)
            if w is None or w.until <= now:
                self.want.pop(key, None)
                if last is None or last.power_kw is None:
                    continue
                if last.until is not None and last.until <= now:
                    del self.sent[key]  # it ran out at the station: back on its baseline
                    continue
                goal = Sent(None, None, s.can_discharge)  # released early: say so
            elif w.fcr is not None and self._droops_locally(station, s):
                goal = Sent(round(w.base_kw, 2), w.until, s.can_discharge, w.fcr)
                if (
                    last is not None
                    and (last.power_kw, last.fcr) == (goal.power_kw, goal.fcr)
                    and last.until is not None
                    and last.until - now > (w.until - now) / 2.0
                ):
                    # The curve at the station already answers this frequency: no call.
                    self.counts["fcr_held_locally"] += 1
                    continue
            else:
                goal = Sent(round(w.power_kw, 2), w.until, s.can_discharge)
            if goal == last:
                continue
            await self._send_profile(station, key, s, goal, w)

    def _droops_locally(self, station: Station, s: EvseSession) -> bool:
        """Whether ``s`` gets FCR as a LocalFrequency curve (an OCPP 2.1 session that may
        discharge, at a station that takes W); the others follow central setpoints."""
        return s.version == "2.1" and s.can_discharge and self.units.get(station.id, "W") == "W"

    async def _send_profile(
        self, station: Station, key: Key, s: EvseSession, goal: Sent, w: Want | None
    ) -> None:
        target = Target(
            version=s.version,
            evse_id=key[1],
            transaction_id=s.transaction_id,
            can_discharge=s.can_discharge,
            max_charge_w=1000.0 * float(telemetry_fields(s, self.assume)["max_charge_kw"] or 0.0),
            max_discharge_w=1000.0 * s.ev_max_discharge_kw,
            watts_per_amp=230.0 * s.phases,
        )
        unit = self.units.get(station.id, "W")
        started = time.monotonic()
        try:
            answer = await self._call_profile(station, key, s, target, goal, unit)
            if answer.get("status") == "Rejected" and unit == "W":
                # Some stations take limits in A only (SmartChargingCtrlr.RateUnit): try
                # once in A at the nominal voltage, and keep to A if that is taken.
                again = await self._call_profile(station, key, s, target, goal, "A")
                if again.get("status") == "Accepted":
                    self.units[station.id] = "A"
                    self.log.info("ocpp_station_takes_amperes", station=station.id)
                    answer = again
        finally:
            self.sent[key] = goal  # tried: a refusal is not retried until the setpoint changes
        done = time.monotonic()
        self.call_rtt_s.append(done - started)
        if w is not None:
            self.setpoint_latency_s.append(done - w.heard_at)
            self.latency.observe(done - w.heard_at)
        if answer.get("status") != "Accepted":
            self.counts["profile_rejected"] += 1
            self.log.warning(
                "ocpp_profile_rejected",
                station=station.id,
                evse=key[1],
                vehicle=s.vehicle_id,
                status=answer.get("status"),
                reason=(answer.get("statusInfo") or {}).get("reasonCode"),
            )
        else:
            self.counts["profile_accepted"] += 1

    async def _call_profile(
        self, station: Station, key: Key, s: EvseSession, target: Target, goal: Sent, unit: str
    ) -> Json:
        payload = set_charging_profile(
            target, goal.power_kw, now=self.clock.now(), until=goal.until, unit=unit, fcr=goal.fcr
        )
        if goal.fcr is not None and unit == "W":
            self.counts["profiles_local_frequency"] += 1
        if not s.can_discharge and negative_values(payload):  # never, but never ever send it
            self.counts["profile_withheld"] += 1
            self.log.error("ocpp_negative_profile_withheld", station=station.id, evse=key[1])
            return {"status": "Withheld"}
        # chargers/profiles.py is held to the schema by tests (tests/unit/test_ocpp_mapping.py)
        return await station.call_raw("SetChargingProfile", payload, validate=False)

    # -- the fleet's side (MQTT) ----------------------------------------------------------

    def on_mqtt(self, message: aiomqtt.Message) -> None:
        """A SetpointBatch for our vehicles: note what each must hold, wake their stations."""
        heard = time.monotonic()
        payload = message.payload if isinstance(message.payload, bytes | bytearray) else b""
        try:
            batch = SetpointBatch.model_validate_json(payload)
        except ValidationError as err:
            self.counts["setpoints_refused"] += 1
            self.log.warning("ocpp_setpoints_refused", error=str(err.errors()[0].get("msg")))
            return
        if batch.bridge_id != self.bridge_id:
            self.counts["setpoints_refused"] += 1
            return
        issued = to_epoch(batch.issued_at)
        touched: set[str] = set()
        droop = batch.fcr
        activation = 0.0 if droop is None else droop.activation(droop.frequency_hz)
        shares = batch.fcr_capacity_kw or [0.0] * len(batch)
        for vid, power, until, share in zip(
            batch.vehicle_id, batch.power_kw, batch.valid_until, shares, strict=True
        ):
            key = self.by_vehicle.get(vid)
            if key is None:
                self.counts["setpoints_unknown_vehicle"] += 1
                continue
            old = self.want.get(key)
            if old is not None and issued <= old.issued:
                self.counts["setpoints_superseded"] += 1
                continue
            fcr = (
                None
                if droop is None or share <= 0
                else Fcr(
                    round(share, 2), droop.nominal_hz, droop.deadband_hz, droop.full_activation_hz
                )
            )
            self.want[key] = Want(power, until, issued, heard, fcr, power - activation * share)
            touched.add(key[0])
        self.counts["setpoints"] += len(batch)
        for sid in touched:
            station = self.stations.get(sid)
            if station is not None:
                self._post_sync(station)

    async def _report_loop(self) -> None:
        """Every telemetry interval: every live session; and setpoints that ran out."""
        interval = self.settings.telemetry_interval_s
        while True:
            live = [k for k in self.sessions if k[0] in self.stations]
            await self._publish(live)
            now = self.clock.now()
            for sid in {k[0] for k, w in self.want.items() if w.until <= now}:
                if sid in self.stations:
                    self._post_sync(self.stations[sid])
            await self.clock.sleep(interval)

    async def _flush_loop(self) -> None:
        """Sessions a station's message changed, and ended ones, go out at once."""
        while True:
            await self._wake.wait()
            await asyncio.sleep(FLUSH_WALL_S)
            self._wake.clear()
            keys = [k for k in self._dirty if k in self.sessions and k[0] in self.stations]
            self._dirty.clear()
            await self._publish(keys)

    async def _publish(self, keys: list[Key]) -> None:
        ended, self.ended = self.ended, []
        rows = [self.sessions[k] for k in keys] + ended
        if not rows:
            return
        now = self.clock.now()
        for i in range(0, len(rows), MAX_BATCH_VEHICLES):
            body = self._batch(rows[i : i + MAX_BATCH_VEHICLES], now)
            # QoS 0: while the broker is away a report is dropped, the next one follows.
            with contextlib.suppress(TransportError):
                await self.link.publish_many(
                    [Outgoing(self.topics.bridge_telemetry(self.bridge_id), body, qos=0)]
                )

    def _batch(self, rows: list[EvseSession], now: float) -> bytes:
        cols: dict[str, list[Any]] = {"vehicle_id": [], "seq": [], "ts": []}
        for s in rows:
            s.seq += 1
            cols["vehicle_id"].append(s.vehicle_id)
            cols["seq"].append(s.seq)
            cols["ts"].append(now)
            for name, value in telemetry_fields(s, self.assume).items():
                cols.setdefault(name, []).append(value)
        batch = TelemetryBatch.model_validate(
            {"bridge_id": self.bridge_id, "sent_at": from_epoch(now), **cols}
        )
        return batch.to_json()

    async def _summary_loop(self) -> None:
        """One ``ocpp_summary`` line every ``summary_every_wall_s``: what the gateway holds
        and the SetChargingProfile round trips since the last line."""
        while True:
            await asyncio.sleep(self.settings.summary_every_wall_s)
            rtt = sorted(self.call_rtt_s)
            self.call_rtt_s.clear()
            extra = (
                {
                    "profile_rtt_p50_ms": round(rtt[len(rtt) // 2] * 1e3, 1),
                    "profile_rtt_max_ms": round(rtt[-1] * 1e3, 1),
                }
                if rtt
                else {}
            )
            self.log.info("ocpp_summary", **self.summary(), **extra)

    def summary(self) -> dict[str, Any]:
        """What the gateway holds, as counts (logged, and read by tests and benches)."""
        return {
            "stations": len(self.stations),
            "sessions": len(self.sessions),
            "can_discharge": sum(s.can_discharge for s in self.sessions.values()),
            **dict(self.counts),
        }


@dataclass(slots=True)
class Histogram:
    """Counts of observations per upper bound (the last: above every bound) and their
    sum, since the start: what a Prometheus histogram reports."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, int]]:
        """(le, count of observations <= le) for each bound and "+Inf"."""
        out, running = [], 0
        for le, n in zip([*map(str, self.bounds), "+Inf"], self.counts, strict=True):
            running += n
            out.append((le, running))
        return out


def _unplugged_copy(s: EvseSession) -> EvseSession:
    c = EvseSession(
        station_id=s.station_id,
        evse_id=s.evse_id,
        version=s.version,
        vehicle_id=s.vehicle_id,
        soc=s.soc,
        capacity_kwh=s.capacity_kwh,
        seq=s.seq,
    )
    c.plugged = False
    return c
