"""Settings every process reads: flags, then ``V2G_*`` environment variables, then defaults.

The connection's fields are here, at the bus edge; the other concerns' are in
core/settings.py, and :class:`Settings` puts them together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Self
from urllib.parse import unquote, urlsplit, urlunsplit

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from broker.topics import Topics
from core.settings import (
    ClockSettings,
    ControlLoopSettings,
    DispatchPolicySettings,
    LogSettings,
    MetricsSettings,
    ScaleOutSettings,
)

_BROKER_SCHEMES = ("mqtt", "mqtts", "tcp", "ssl")
_REDIS_SCHEMES = ("redis", "rediss", "unix")


def check_broker_url(url: str) -> str:
    """``url`` if it names a broker, ``mqtt[s]://[user:pass@]HOST[:PORT]``; else ValueError
    saying how to write one."""
    try:
        parts = urlsplit(url)
        ok = parts.scheme in _BROKER_SCHEMES and bool(parts.hostname)
        _ = parts.port  # a port that is not a number raises here
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"{url!r} is not a broker URL; use mqtt://HOST:PORT (mqtts:// for TLS)")
    return url


def check_redis_url(url: str) -> str:
    """``url`` if it names a Redis server, ``redis[s]://HOST[:PORT][/DB]`` or ``unix://``."""
    try:
        parts = urlsplit(url)
        ok = parts.scheme in _REDIS_SCHEMES and bool(parts.hostname or parts.scheme == "unix")
        _ = parts.port
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"{url!r} is not a Redis URL; use redis://HOST:PORT/DB")
    return url


class ConnectionSettings(BaseModel):
    """Where a process talks and under which names: broker, Redis, prefixes, credentials,
    and how the MQTT connection behaves (keepalive, will, reconnect, publish timeout)."""

    broker_url: str = "mqtt://127.0.0.1:1883"
    redis_url: str = "redis://127.0.0.1:6379/0"
    topic_prefix: str = "v2g"
    # Empty: the topic prefix, so two deployments on one Redis keep apart by default.
    redis_prefix: str = Field(
        "", description="Redis keys live under '{redis_prefix}:'; default the topic prefix"
    )
    username: str | None = None
    password: SecretStr | None = None
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    client_id: str | None = None
    mqtt_protocol: Literal["auto", "5", "3.1.1"] = Field(
        "auto",
        description="MQTT version of the general client: auto tries 5 and falls back to"
        " 3.1.1 when the broker refuses it; name the broker's own to skip the refusal",
    )
    keepalive_s: int = Field(15, ge=2)
    will_delay_s: int = Field(
        0,
        ge=0,
        description="MQTT 5 will delay: a vehicle that reconnects within it causes no"
        " offline flap; 0 publishes the will at once (offline within ~1 s)",
    )
    reconnect_min_s: float = Field(0.2, gt=0.0)
    reconnect_max_s: float = Field(10.0, gt=0.0)
    publish_timeout_s: float = Field(10.0, gt=0.0)

    @field_validator("broker_url")
    @classmethod
    def _is_broker_url(cls, v: str) -> str:
        return check_broker_url(v)

    @field_validator("redis_url")
    @classmethod
    def _is_redis_url(cls, v: str) -> str:
        return check_redis_url(v)

    @field_validator("topic_prefix")
    @classmethod
    def _prefix_has_no_wildcards(cls, v: str) -> str:
        if not v or any(c in v for c in "+#") or v.startswith("/") or v.endswith("/"):
            raise ValueError(f"topic prefix {v!r} must be non-empty, without '+', '#' or edge '/'")
        return v

    @model_validator(mode="after")
    def _redis_prefix_follows_topic_prefix(self) -> Self:
        if not self.redis_prefix:
            self.redis_prefix = self.topic_prefix
        return self

    @property
    def topics(self) -> Topics:
        return Topics(self.topic_prefix)

    def deployment(self) -> dict[str, Any]:
        """Where this process talks and under which names, for its start line: broker and
        Redis URLs (passwords masked), topic prefix and Redis prefix."""
        return {
            "broker": without_password(self.broker_url),
            "redis": without_password(self.redis_url),
            "topic_prefix": self.topic_prefix,
            "redis_prefix": self.redis_prefix,
        }


class Settings(
    ConnectionSettings,
    ClockSettings,
    ControlLoopSettings,
    DispatchPolicySettings,
    ScaleOutSettings,
    LogSettings,
    MetricsSettings,
    BaseSettings,
):
    """One settings object per process; every timing value is here so tests can shrink it.

    The fields are grouped by concern (the connection above; the clock, the control loop,
    the dispatch policy, scale-out, logs and metrics in core/settings.py); this class alone reads
    them from flags and ``V2G_*`` variables.
    """

    model_config = SettingsConfigDict(env_prefix="V2G_", extra="ignore", validate_default=True)

    def mqtt_target(self) -> MqttTarget:
        return MqttTarget.parse(self.broker_url, self)


def without_password(url: str) -> str:
    """``url`` with any password in it replaced by ``***`` (for logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


@dataclass(frozen=True, slots=True)
class MqttTarget:
    """Where and how to connect, parsed from ``mqtt://[user:pass@]host[:port]`` or ``mqtts://``."""

    host: str
    port: int
    tls: bool
    username: str | None
    password: str | None

    @classmethod
    def parse(cls, url: str, settings: Settings | None = None) -> MqttTarget:
        parts = urlsplit(check_broker_url(url))
        assert parts.hostname is not None  # check_broker_url: it names a host
        tls = parts.scheme in ("mqtts", "ssl")
        user = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password else None
        if settings is not None:
            user = settings.username or user
            if settings.password is not None:
                password = settings.password.get_secret_value()
            tls = tls or settings.tls_ca_file is not None
        return cls(parts.hostname, parts.port or (8883 if tls else 1883), tls, user, password)
