"""What every layer shares and nothing else: the physics of DESIGN.md (:mod:`core.physics`),
the platform clock (:mod:`core.clock`), the one exception tree (:mod:`core.errors`) and the
settings by concern (:mod:`core.settings`).

No I/O and no imports from the rest of the project, so the aggregator, the simulated
vehicles and the bus edge (broker/) all build on it without depending on each other
(docs/ARCHITECTURE.md).
"""
