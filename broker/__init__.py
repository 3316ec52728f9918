"""The wire contract of the V2G platform and the MQTT plumbing every process shares.

Its errors are in the platform's one exception tree, drawn in :mod:`core.errors`.
"""
