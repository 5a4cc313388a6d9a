"""`GET /health` and `GET /metrics`."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from app import metrics
from app.deps import CacheDep

router = APIRouter(tags=["operations"])


@router.get("/health")
async def health(cache: CacheDep) -> dict[str, str]:
    """200 whenever the service can serve, which it can with Redis down too."""
    return {"status": "ok", "redis": await cache.health()}


@router.get("/metrics", response_class=Response)
async def prometheus_metrics(request: Request) -> Response:
    """Prometheus exposition; with several workers, the sum over all of them."""
    body, content_type = metrics.render(request.headers.get("accept", ""))
    return Response(body, headers={"content-type": content_type})
