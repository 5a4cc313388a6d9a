"""`GET /health` and `GET /metrics`."""

from __future__ import annotations

from fastapi import APIRouter, Response

from app import metrics
from app.deps import CacheDep

router = APIRouter(tags=["operations"])


@router.get("/health")
async def health(cache: CacheDep) -> dict[str, str]:
    """200 whenever the service can serve, which it can with Redis down too."""
    return {"status": "ok", "redis": await cache.health()}


@router.get("/metrics", response_class=Response)
async def prometheus_metrics() -> Response:
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)
