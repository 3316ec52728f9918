"""Simulated electric vehicles: drivers, faults, and their MQTT runtime (the physics is core.physics)."""
