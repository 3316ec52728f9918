"""MQTT client ids: every process derives its own here, so deployments never collide.

A broker keeps one session per client id and closes the older of two connections that
use one ("session taken over"); two processes with the same id then knock each other
off in a loop. So every id starts with the deployment's topic prefix (two deployments on
one broker differ), and a connection that two processes of one deployment may open at
once (an aggregator's secondary links, operator commands) also carries the host and the
process id, plus a count when one process opens several:

===========================  ==========================================
aggregator (main)            ``{prefix}-aggregator``; in a share group
                             ``{prefix}-aggregator-{host}-{pid}``
aggregator's fast links      ``{prefix}-ingest-{host}-{pid}``,
                             ``{prefix}-setpoints-{host}-{pid}``
a process's clock link       ``{prefix}-clock-{host}-{pid}``
a vehicle (per-vehicle)      ``{prefix}-{vehicle_id}``
a bridge (multiplexed)       ``{prefix}-{bridge_id}``
operator commands            ``{prefix}-cli-{host}-{pid}``
===========================  ==========================================

``V2G_CLIENT_ID`` / ``--client-id`` replaces the id of a process's one main connection
(the aggregator's, an operator command's): see :func:`main_client_id`.
"""

from __future__ import annotations

import os
import socket
from collections import Counter

from broker.settings import Settings

# Per-process ids handed out so far: a second link of one kind in this process (tests,
# the demo, several services in one process) gets "-1", "-2"... and still differs.
_issued: Counter[str] = Counter()


def client_id(prefix: str, name: str, *, per_process: bool = False) -> str:
    """``{prefix}-{name}``, and with ``per_process`` ``-{host}-{pid}`` (``-{n}`` for the
    n-th further one this process asks for), unique among the processes on a broker."""
    base = f"{prefix}-{name}"
    if not per_process:
        return base
    base = f"{base}-{socket.gethostname()}-{os.getpid()}"
    n = _issued[base]
    _issued[base] += 1
    return base if n == 0 else f"{base}-{n}"


def main_client_id(settings: Settings, name: str, *, per_process: bool = False) -> str:
    """The id of a process's one main connection: ``settings.client_id``
    (``V2G_CLIENT_ID`` / ``--client-id``) when set, else :func:`client_id`."""
    return settings.client_id or client_id(settings.topic_prefix, name, per_process=per_process)
