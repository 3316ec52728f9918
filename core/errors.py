"""The platform's one exception tree: callers retry on transport, never on decoding.

Every error the platform raises on purpose is a :class:`V2GError`; what a caller does
with one follows from its branch::

    V2GError                     core/errors.py
    ├── TransportError           broker or state store unreachable: retry with backoff
    │   ├── AuthenticationError  bad credentials: do not retry, fix the settings
    │   │   └── StationAuthError agents/ocpp_stations.py: a CSMS refused a station (401/403)
    │   ├── BrokerDisconnected   broker/mqtt5link.py: the broker's DISCONNECT and its reason
    │   └── LeaseUnavailable     aggregator/lease.py: Redis did not answer a lease operation
    ├── PublishRefused           the broker refused a publish (ACL): fix credentials or ACL
    ├── InvalidMessage           a payload or topic broke the wire contract: drop, count, log
    │   └── ProfileRefused       agents/ocpp_model.py: a charging profile a station refuses
    ├── FencedOut                aggregator/lease.py: a newer leader exists; stop writing
    ├── ScenarioError            v2g/scenario.py: a scenario file that does not validate
    ├── GridError                aggregator/grid.py: a grid topology file that does not validate
    ├── ActionRefused            v2g/web/app.py: a web action that is not valid: answer 4xx
    ├── ListenError              v2g/web/serve.py: the web view cannot listen: fix --listen
    ├── ProvisionError           v2g/provision.py: credentials could not be provisioned
    └── CallErrorReceived        chargers/csms.py: a station answered our CALL with a
                                 CALLERROR: log and count; the same CALL would fail again

The roots live here, below every layer; an error that belongs to one layer's job is
defined beside that job (the file named above) and hangs from one of them. A new
exception class joins this drawing: tests/unit/test_errors.py checks that it does.
"""

from __future__ import annotations


class V2GError(Exception):
    """Base of every error the platform raises on purpose."""


class TransportError(V2GError):
    """The broker or the state store could not be reached. Retrying may help."""


class AuthenticationError(TransportError):
    """The broker refused our credentials. Retrying will not help: fix the settings."""


class PublishRefused(V2GError):
    """The broker took a publish and refused it (an MQTT 5 reason code, e.g. 135 "Not
    authorized" from the ACL). Retrying will not help: fix the credentials or the ACL."""


class InvalidMessage(V2GError):
    """A message broke the wire contract. Drop it, count it under ``reason``, log it.

    ``reason`` is a short stable label (``json``, ``schema``, ``identity``, ``topic``,
    ``stale``, ``future``, ``size``, ``rate``) so rejections can be counted by kind.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
