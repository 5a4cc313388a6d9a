"""`GET /health` and `GET /metrics`."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from app import metrics
from app.deps import CacheDep
from app.routes.schemas import Health

router = APIRouter(tags=["operations"])


@router.get("/health")
async def health(cache: CacheDep) -> Health:
    """200 whenever the service can serve, which it can with Redis down too."""
    return Health(status="ok", redis=await cache.health())


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "description": "Prometheus text format, or OpenMetrics when the Accept header asks",
            "content": {
                "text/plain": {"schema": {"type": "string"}},
                "application/openmetrics-text": {"schema": {"type": "string"}},
            },
        }
    },
)
async def prometheus_metrics(request: Request) -> Response:
    """Prometheus exposition; with several workers, the sum over all of them."""
    body, content_type = metrics.render(request.headers.get("accept", ""))
    return Response(body, headers={"content-type": content_type})
