"""The ``v2g`` commands, by audience: :mod:`.serve` runs the processes, :mod:`.operate`
talks to a live fleet, :mod:`.tools` works offline. :mod:`.options` holds the shared flags
and parsers, :mod:`.running` how a command runs and fails, :mod:`.output` how answers
print. v2g/cli.py assembles them into the ``v2g`` app; no command module imports another."""
