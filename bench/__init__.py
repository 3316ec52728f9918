"""The benchmarks: measurements, not tests; see docs/benchmarks.md.

Each one is a module run from the repository root, against the project's editable install
(``pip install -e .``)::

    .venv/bin/python -m bench.runall --quick      # all of them, one table (or bench/run)
    .venv/bin/python -m bench.schedule_solve      # one of them

What they share (the table's rows, the table printed, the JSON written with its
provenance, the loopback broker) is in :mod:`bench.common`. This package is not shipped
in the wheel.
"""
