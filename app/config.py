"""Settings: every environment variable of SPEC.md, read once at start-up."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """The service's configuration, from the environment and a `.env` file."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", case_sensitive=False)

    whatsapp_api_url: str
    crm_api_url: str
    crm_api_token: SecretStr | None = None
    upstream_timeout_seconds: float = Field(10.0, gt=0)
    upstream_batch_size: int = Field(100, ge=1, le=100)
    upstream_max_connections: int = Field(
        200,
        ge=1,
        description="Connections of each upstream pool (the contacts API and the CRM have one).",
    )
    upstream_max_calls_per_instance: int = Field(
        100,
        ge=1,
        description="Concurrent calls of one instance to each upstream API; more wait for a turn "
        "within UPSTREAM_TIMEOUT_SECONDS, so one hanging tenant cannot hold a whole pool.",
    )
    upstream_max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    max_active_requests: int = Field(32, ge=1)
    admission_queue_timeout_seconds: float = Field(2.0, gt=0)

    use_redis: bool = True
    redis_url: str = "redis://localhost:6379/0"
    redis_mode: Literal["standalone", "cluster", "sentinel"] = "standalone"
    redis_sentinels: str | None = None
    redis_sentinel_master: str = "mymaster"
    redis_timeout_seconds: float = Field(0.25, gt=0)
    redis_max_connections: int = Field(64, ge=1)
    redis_breaker_failures: int = Field(3, ge=1)
    redis_breaker_cooldown_seconds: float = Field(5.0, gt=0)

    cache_ttl_seconds: int = Field(300, ge=1)
    cache_negative_ttl_seconds: int = Field(60, ge=0)
    cache_key_prefix: str = ""
    cache_refresh_ahead_seconds: int = Field(0, ge=0)
    cache_stale_seconds: int = Field(0, ge=0)
    cache_lease_wait_seconds: float = Field(1.0, ge=0)
    cache_max_value_bytes: int = Field(1024 * 1024, ge=1)

    admin_token: SecretStr | None = None
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    log_format: Literal["json", "console"] = "json"

    @field_validator("whatsapp_api_url", "crm_api_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
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

    @field_validator("crm_api_token", "admin_token", "redis_sentinels", mode="before")
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
