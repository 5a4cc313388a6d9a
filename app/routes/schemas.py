"""Response bodies as the OpenAPI document describes them, and the responses each route shares.

They document what the routes send; only /health, /cache/{instance} and the
stats use them as response models. The contacts page is built as bytes by
app.contacts and described here, never re-validated on the hot path.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ErrorDetail(BaseModel):
    """Every error the service itself produces."""

    detail: str = Field(examples=["upstream contacts API failed"])


class ValidationIssue(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ValidationFailed(BaseModel):
    """422: the request's parameters, listed per problem (or one message)."""

    detail: list[ValidationIssue] | str


class EnrichedContact(BaseModel):
    """One item of the upstream's `data`, every field kept, with `customer` and `user` added."""

    model_config = ConfigDict(extra="allow")

    customer: dict[str, Any] | None = Field(
        description="the CRM customer of `customerId`; null when the id is null, unknown to "
        "the CRM, invalid, or the CRM failed (then `X-Enrichment: partial`)"
    )
    user: dict[str, Any] | None = Field(description="the CRM user of `userId`, as `customer`")


class ContactsPage(BaseModel):
    """The contacts API's page, byte-for-byte the same values, every other field kept."""

    model_config = ConfigDict(extra="allow")

    data: list[EnrichedContact]


class Health(BaseModel):
    status: Literal["ok"]
    redis: Literal["up", "down", "disabled"]


class Deleted(BaseModel):
    deleted: int = Field(description="cached customers and users dropped")


class CachedCounts(BaseModel):
    customers: int | None = Field(description="null when Redis could not be counted")
    users: int | None


class InstanceStats(BaseModel):
    instance: str
    redis: Literal["up", "down", "disabled"]
    cached: CachedCounts
    hits: int
    misses: int
    hit_ratio: float | None = Field(description="null before the first lookup")
    counts_scope: str = Field(description="what `hits` and `misses` count")


Responses = dict[int | str, dict[str, Any]]

REQUEST_ID_HEADER: dict[str, Any] = {
    "X-Request-ID": {
        "description": "the caller's X-Request-ID, or one generated for this request",
        "schema": {"type": "string"},
    }
}

# The same problem with the request's parameters, on every route that has some.
VALIDATION_FAILED: Responses = {
    422: {"model": ValidationFailed, "description": "A parameter is missing or malformed"}
}
