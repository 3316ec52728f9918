"""What every layer shares and nothing else: the physics of DESIGN.md and the platform clock.

Pure code with no I/O and no imports from the rest of the project, so the aggregator,
the simulated vehicles and the bus edge (broker/) all build on it without depending on
each other (docs/ARCHITECTURE.md).
"""
