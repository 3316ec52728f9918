"""One exception tree for the platform; callers retry on transport, never on decoding."""

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
