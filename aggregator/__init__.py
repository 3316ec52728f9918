"""The aggregator: pools telemetry into fleet state, computes the capability envelope,
dispatches grid requests across vehicles and publishes fleet status."""
