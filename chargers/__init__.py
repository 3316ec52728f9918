"""Real chargers: an OCPP 2.1 / 2.0.1 CSMS gateway that brings charging stations into the fleet.

The gateway is a bridge in the sense of DESIGN.md: it reports its EVs' telemetry into the
fleet as ``TelemetryBatch`` messages and turns the setpoints the aggregator sends it into
``SetChargingProfile`` calls. Allocation stays in the aggregator.

- ``auth``: station credentials (salted scrypt hashes in Redis) and HTTP Basic checks;
- ``sessions``: pure mapping from OCPP messages to a vehicle's ``Telemetry`` fields;
- ``profiles``: pure mapping from a setpoint to a ``SetChargingProfile`` payload;
- ``csms``: the websocket server and the per-station OCPP handlers;
- ``gateway``: the MQTT bridge around them.
"""
