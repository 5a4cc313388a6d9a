"""Settings: every variable of the service (docs/configuration.md), read once at start-up."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """The service's configuration, from the environment and a `.env` file."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", case_sensitive=False)

    # Each description is the documentation: scripts/gen_config_docs.py writes
    # .env.example and docs/configuration.md from these fields (`make config-docs`).
    whatsapp_api_url: str = Field(
        description="Base URL of the WhatsApp contacts API: the service calls"
        " GET {url}/{instance}/contacts.",
        examples=["http://127.0.0.1:8081"],
    )
    crm_api_url: str = Field(
        description="Base URL of the CRM API: GET {url}/{instance}/customers?ids=... and"
        " /users?ids=.... May be the same host as the contacts API.",
        examples=["http://127.0.0.1:8081"],
    )
    crm_api_token: SecretStr | None = Field(
        None,
        description="Bearer token for the CRM calls. Recommended: one cached object then serves"
        " every caller of an instance. Unset: the caller's Authorization header goes to the CRM"
        " and cached entries are scoped to that credential.",
    )
    upstream_timeout_seconds: float = Field(
        10.0,
        gt=0,
        description="Deadline for one whole upstream call (connect, headers and body), in"
        " seconds: a contacts call past it is a 504, a CRM batch past it a failed batch.",
    )
    upstream_batch_size: int = Field(
        100, ge=1, le=100, description="Ids per CRM call (the CRM refuses more than 100)."
    )
    upstream_max_connections: int = Field(
        200,
        ge=1,
        description="Connections of each upstream pool, per process: the contacts API and the"
        " CRM have one each.",
    )
    upstream_max_calls_per_instance: int = Field(
        100,
        ge=1,
        description="Concurrent calls of one instance to each upstream API, per process; more"
        " wait for a turn within UPSTREAM_TIMEOUT_SECONDS, so one hanging tenant cannot hold a"
        " whole pool.",
    )
    upstream_max_body_bytes: int = Field(
        32 * 1024 * 1024,
        ge=1024,
        description="Largest upstream body accepted, in bytes, counted after decompression:"
        " a larger contacts body is a 502, a larger CRM answer a failed batch.",
    )
    max_active_requests: int = Field(
        32,
        ge=1,
        description="/contacts requests that do CPU work at once (parse the page, read Redis,"
        " build the answer), per process; the others wait their turn, in order. The waits on"
        " the contacts API and the CRM hold no turn.",
    )
    admission_queue_timeout_seconds: float = Field(
        2.0,
        gt=0,
        description="Longest wait for a turn, in seconds; a request still waiting then gets a"
        " 503 with Retry-After.",
    )

    use_redis: bool = Field(
        True,
        description="The cache toggle: false never connects to Redis and resolves every request"
        " from the CRM (still deduplicated and batched).",
    )
    redis_url: str = Field(
        "redis://localhost:6379/0",
        description="redis://, rediss:// (TLS) or unix:// URL; in cluster mode any node of the"
        " cluster.",
    )
    redis_mode: Literal["standalone", "cluster", "sentinel"] = Field(
        "standalone", description="How Redis is deployed."
    )
    redis_sentinels: str | None = Field(
        None, description="Sentinel mode: the sentinels, as host:port,host:port."
    )
    redis_sentinel_master: str = Field(
        "mymaster", description="Sentinel mode: the name of the monitored primary."
    )
    redis_timeout_seconds: float = Field(
        0.25,
        gt=0,
        description="Connect and command timeout of cache calls, in seconds: the most Redis can"
        " add to a request.",
    )
    redis_max_connections: int = Field(
        64, ge=1, description="Connections in the Redis pool, per process."
    )
    redis_breaker_failures: int = Field(
        3,
        ge=1,
        description="Consecutive Redis failures that open the circuit breaker (Redis is then"
        " skipped).",
    )
    redis_breaker_cooldown_seconds: float = Field(
        5.0,
        gt=0,
        description="Seconds the open breaker skips Redis before one probe tries it again.",
    )

    cache_ttl_seconds: int = Field(
        300, ge=1, description="TTL of a cached customer or user, in seconds."
    )
    cache_negative_ttl_seconds: int = Field(
        60,
        ge=0,
        description='TTL of a cached "does not exist" (the JSON null), in seconds; 0 caches'
        " no absence.",
    )
    cache_key_prefix: str = Field(
        "",
        description="Prefix of every key (e.g. contacts:); empty keeps the keys the Node.js"
        " service used.",
    )
    cache_refresh_ahead_seconds: int = Field(
        0,
        ge=0,
        description="Refresh an entry in the background when this little of its TTL is left, in"
        " seconds; 0 turns refresh-ahead off.",
    )
    cache_stale_seconds: int = Field(
        0,
        ge=0,
        description="Serve an entry up to this long past its TTL while the CRM is failing, in"
        " seconds (X-Enrichment: stale); 0 turns it off.",
    )
    cache_lease_wait_seconds: float = Field(
        1.0,
        ge=0,
        description="How long a replica waits for another replica that holds the CRM lease of"
        " an id before fetching it itself, in seconds; 0 turns leases off.",
    )
    cache_max_value_bytes: int = Field(
        1024 * 1024,
        ge=1,
        description="Largest CRM object cached, in bytes; a larger one is served but not stored.",
    )
    cache_scope_secret: SecretStr | None = Field(
        None,
        description="Without CRM_API_TOKEN, cached objects are scoped to each caller's credential"
        " through a keyed hash in the key: the hash's key, the same on every replica. Unset:"
        " derived from REDIS_URL and CACHE_KEY_PREFIX; set a long random value when Redis has"
        " no password.",
    )

    admin_token: SecretStr | None = Field(
        None,
        description="Enables the /cache admin endpoints (Authorization: Bearer <token>); unset,"
        " they answer 404.",
    )
    log_level: Literal["debug", "info", "warning", "error", "critical"] = Field(
        "info", description="Lowest level logged."
    )
    log_format: Literal["json", "console"] = Field(
        "json",
        description="json (one JSON object a line, for log collectors) or console (for people"
        " at a terminal).",
    )

    @field_validator("whatsapp_api_url", "crm_api_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        if "@" in urlsplit(value).netloc:  # refused at start-up, not on every call (app.http1)
            raise ValueError("credentials in the URL are not supported")
        return value.rstrip("/")

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return value

    @field_validator("log_level", "log_format", "redis_mode", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator(
        "crm_api_token", "admin_token", "cache_scope_secret", "redis_sentinels", mode="before"
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @model_validator(mode="after")
    def _sentinels_for_sentinel_mode(self) -> Settings:
        if self.use_redis and self.redis_mode == "sentinel" and not self.sentinel_hosts:
            raise ValueError("REDIS_MODE=sentinel needs REDIS_SENTINELS (host:port,host:port)")
        return self

    @property
    def sentinel_hosts(self) -> list[tuple[str, int]]:
        """`REDIS_SENTINELS` as (host, port) pairs."""
        pairs: list[tuple[str, int]] = []
        for item in (self.redis_sentinels or "").split(","):
            if item.strip():
                host, _, port = item.strip().rpartition(":")
                pairs.append((host, int(port)))
        return pairs


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings (tests build their own `Settings` instead)."""
    return Settings()  # type: ignore[call-arg]
