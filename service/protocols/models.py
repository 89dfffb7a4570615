"""Health, readiness, the served models' descriptions and the metrics page (the anytime API's GET routes)."""

from __future__ import annotations

from typing import Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse

from models.artifact import list_versions
from service.protocols.classify import plane, render
from service.protocols.routes import Route
from service.schemas import ErrorBody, ModelList, ModelView, ServedSummary


def _json(model: Any) -> Response:
    return JSONResponse(model.model_dump(mode="json") if hasattr(model, "model_dump") else model)


async def healthz(request: Request) -> Response:
    """Liveness: the process answers."""
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """Readiness: the models are loaded and warmed up, and the server is not draining."""
    dp = plane(request)
    dp.check_ready()
    registry = dp.registry
    default = registry.get()
    served = {m.name: m.version for m in registry.served()}
    return JSONResponse({"status": "ready", "model": default.name, "version": default.version, "models": served})


async def model_info(request: Request) -> Response:
    """A served model's public manifest: exits, thresholds, accuracies, input spec, live stage times (the
    default model on /v1/model)."""
    name, version = request.path_params.get("name"), request.path_params.get("version")
    return _json(await plane(request).registry.get(name, version).view())


async def models(request: Request) -> Response:
    """Every served model: the version it serves and the versions in the store."""
    registry = plane(request).registry
    listing = ModelList(
        default=registry.default,
        models=[
            ServedSummary(
                name=m.name,
                version=m.version,
                device=m.device,
                exits=m.num_exits,
                classes=len(m.classes),
                versions=list_versions(registry.store, m.name),
                default=m.name == registry.default,
            )
            for m in registry.served()
        ],
    )
    return _json(listing)


async def metrics(request: Request) -> Response:
    """Prometheus metrics (internal: do not expose to the internet)."""
    body, content_type = plane(request).metrics.exposition()
    return Response(body, media_type=content_type)


_VIEW = {"response_model": ModelView, "responses": {404: {"model": ErrorBody}}, "tags": ["Models"]}
_HEALTH = {"tags": ["Health"]}
ROUTES = [
    Route("/healthz", healthz, render, doc={"response_model": dict[str, str], **_HEALTH}),
    Route("/readyz", readyz, render, doc={"responses": {503: {"model": ErrorBody}}, **_HEALTH}),
    Route("/v1/model", model_info, render, doc=_VIEW),
    Route("/v1/models", models, render, doc={"response_model": ModelList, "tags": ["Models"]}),
    *(
        Route(path, model_info, render, doc=_VIEW)
        for path in (
            "/v1/models/{name}",
            "/v1/models/{name}/model",
            "/v1/models/{name}/versions/{version}",
            "/v1/models/{name}/versions/{version}/model",
        )
    ),
    Route("/metrics", metrics, render, doc={"include_in_schema": False}),
]
