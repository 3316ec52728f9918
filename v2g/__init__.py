"""The ``v2g`` command: wires settings, clock, broker, agents and aggregator together."""
