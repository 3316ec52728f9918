"""Simulated electric vehicles: battery and charger physics, drivers, and their MQTT runtime."""
