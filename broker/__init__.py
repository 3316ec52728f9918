"""The wire contract of the V2G platform and the MQTT plumbing every process shares.

Exception tree (see :mod:`broker.errors`)::

    V2GError
    ├── TransportError        the broker went away or refused us: retry with backoff
    │   └── AuthenticationError  bad credentials: do not retry, fix the settings
    └── InvalidMessage        a payload or topic broke the contract: drop it and count it
"""
