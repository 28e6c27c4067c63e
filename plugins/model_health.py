"""The "Model health" page inside the Airflow UI: an Airflow 3 plugin.

A FastAPI app mounted by the API server under ``/closedloop`` serves the page (``/closedloop/``), its data
(``/closedloop/api/health.json``), the reports it links (``/closedloop/reports/...``, read from the
lake, wherever it is) and the loop's metrics for Prometheus (``/closedloop/metrics``,
:mod:`closedloop.adapters.exporter`: the same data in Prometheus's text format); an external view puts
"Model health" in the UI's navigation, shown in an iframe.

One deployment, many models: the page, its JSON and its reports are of the model ``?model=<name>`` names
(default: :func:`closedloop.core.settings.select_model`'s, else the first by name), each request on that model's
own ``Runtime.from_env(model)``; an unknown name is a 404 naming the known models. The page's selector links
every model of :func:`closedloop.core.settings.model_entries` (``/closedloop/api/models.json`` lists them); one
whose configuration is refused is listed with its error, and its own page shows the error (503), the others'
pages are unaffected. ``/closedloop/metrics`` holds every model's series, each labelled ``model``.

Airflow does not protect plugin apps: every route here checks the caller's Airflow token itself, the
``Authorization: Bearer`` header or else the UI's ``_token`` cookie (what the browser sends from the UI),
with the auth manager's own validation (signature, expiry, revocation), then asks the auth manager
whether that user may see the website. No token or a bad one: 401; a user without access: 403.
``/closedloop/metrics`` also takes a scrape token as its bearer token, the Airflow option ``[closedloop]
metrics_token`` (``AIRFLOW__CLOSEDLOOP__METRICS_TOKEN``; compose sets it on the API server alone): Prometheus
cannot renew Airflow's tokens, which expire (``[api_auth] jwt_expiration_time``). It opens no other route;
unset, the route takes Airflow tokens only.

Importing this module stays cheap (the scheduler, the dag-processor and task processes load plugins too):
the FastAPI app is built on its first request, and closedloop, MLflow and the auth manager are imported
inside the handlers. (No ``from __future__ import annotations`` here: FastAPI reads the handlers'
annotations, which name classes imported inside :func:`build_app`.)
"""

import html
import logging
from typing import Any

from airflow.plugins_manager import AirflowPlugin

log = logging.getLogger(__name__)

URL_PREFIX = "/closedloop"
COOKIE = "_token"  # airflow.api_fastapi.auth.managers.base_auth_manager.COOKIE_NAME_JWT_TOKEN


def _auth_manager() -> Any:
    from airflow.api_fastapi.app import create_auth_manager, get_auth_manager

    try:
        return get_auth_manager()  # the API server's own, initialised at its start
    except RuntimeError:
        return create_auth_manager()  # outside the API server (tests, a bare app)


def _token(request: Any) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, credentials = header.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()  # an explicit credential wins over the session cookie, as in Airflow
    return request.cookies.get(COOKIE) or None


async def airflow_user(request: Any) -> Any:
    """The Airflow user of the request's token; 401 without a valid one, 403 without access to the UI."""
    from airflow.api_fastapi.auth.managers.models.resource_details import AccessView
    from fastapi import HTTPException
    from jwt import InvalidTokenError

    token = _token(request)
    if not token:
        raise HTTPException(401, "Not authenticated: log in to Airflow (the UI sets the _token cookie) or send "
                                 "'Authorization: Bearer <token>' (POST /auth/token gives one)")
    manager = _auth_manager()
    try:
        user = await manager.get_user_from_token(token)
    except InvalidTokenError as exc:
        raise HTTPException(401, f"Invalid or expired Airflow token ({type(exc).__name__}): log in again") from None
    if not manager.is_authorized_view(access_view=AccessView.WEBSITE, user=user):
        raise HTTPException(403, f"user {user.get_name()!r} may not view the Airflow UI")
    return user


def _runtime(model: str) -> Any:
    import closedloop.adapters.airflow.secrets  # noqa: F401  (Airflow's log masker for what this Runtime reads)
    from closedloop.stages.runtime import Runtime

    return Runtime.from_env(model)


def _models() -> tuple[list[dict[str, Any]], str]:
    """Every model with its configuration's error (:func:`closedloop.stages.health.model_choices`) and the default
    one (:func:`closedloop.core.settings.select_model`'s, else the first by name); 503 when none can be listed."""
    from fastapi import HTTPException

    from closedloop.core.errors import ConfigError
    from closedloop.core.settings import select_model
    from closedloop.stages import health

    try:
        choices = health.model_choices()
    except ConfigError as exc:
        raise HTTPException(503, f"no models to show: {exc}") from None
    try:
        default = select_model().name
    except ConfigError:  # several namespaced models and none named by CLOSEDLOOP_MODEL: the first
        default = choices[0]["name"] if choices else ""
    return choices, default


def _choose(model: str | None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The model a request names (``?model=``; default: :func:`_models`'s) and every model; 404 naming the known
    models when it names none of them."""
    from fastapi import HTTPException

    choices, default = _models()
    name = (model or "").strip() or default
    current = next((c for c in choices if c["name"] == name), None)
    if current is None:
        known = ", ".join(c["name"] for c in choices) or "none"
        raise HTTPException(404, f"no model {name!r} in this deployment; known models: {known}")
    return current, choices


def _refused(current: dict[str, Any]) -> Exception:
    from fastapi import HTTPException

    return HTTPException(503, f"the configuration of model {current['name']!r} is refused: {current['error']}")


def _gather(model: str) -> dict[str, Any]:
    """The page's data of ``model``; 503 naming what failed when the registry or the lake cannot be read."""
    from fastapi import HTTPException

    from closedloop.stages import health

    try:
        return health.gather(_runtime(model))
    except Exception as exc:  # the page's boundary: any failure of MLflow or the lake
        log.exception("model health: could not gather the page's data of %s", model)
        raise HTTPException(503, f"model health of {model!r} unavailable: {type(exc).__name__} while reading the "
                                 "MLflow registry or the lake; check that both are reachable from the API server "
                                 "(details in the API server's log)") from None


def metrics_token() -> str:
    """The scrape token of ``/closedloop/metrics`` (Airflow's ``[closedloop] metrics_token``); empty: none."""
    from airflow.configuration import conf

    return (conf.get("closedloop", "metrics_token", fallback="") or "").strip()


async def scraper(request: Any) -> Any:
    """Prometheus with the scrape token (compared in constant time), else an Airflow user as
    :func:`airflow_user` demands."""
    import hmac

    expected = metrics_token()
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if expected and scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), expected.encode()):
        return "prometheus"
    return await airflow_user(request)


def build_app() -> Any:
    """The FastAPI app: every route depends on :func:`airflow_user`, ``/metrics`` on :func:`scraper`."""
    from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    async def user(request: Request) -> Any:
        return await airflow_user(request)

    async def prometheus(request: Request) -> Any:
        return await scraper(request)

    app = FastAPI(title="closedloop model health", docs_url=None, redoc_url=None, openapi_url=None)
    pages = APIRouter(dependencies=[Depends(user)])

    @app.exception_handler(StarletteHTTPException)
    async def error(request: Request, exc: StarletteHTTPException) -> Response:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
        if "text/html" in request.headers.get("accept", ""):
            body = (f"<!doctype html><html><body><h1>{exc.status_code}</h1><p>{html.escape(str(exc.detail))}</p>"
                    "<p><a href='/' target='_top'>Airflow</a></p></body></html>")
            return HTMLResponse(body, status_code=exc.status_code, headers=headers)
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=headers)

    @pages.get("/", response_class=HTMLResponse)
    def page(model: str | None = None) -> HTMLResponse:
        from closedloop.stages import health

        current, choices = _choose(model)
        if current["error"]:  # the page still lists the others: the selector and the error
            return HTMLResponse(health.render_refused(current["name"], current["error"], choices), status_code=503,
                                headers={"Cache-Control": "no-store"})
        return HTMLResponse(health.render_page(_gather(current["name"]), report_base="reports/", models=choices),
                            headers={"Cache-Control": "no-store"})

    @pages.get("/api/health.json")
    def health_json(model: str | None = None) -> JSONResponse:
        current, _ = _choose(model)
        if current["error"]:
            raise _refused(current)
        return JSONResponse(_gather(current["name"]), headers={"Cache-Control": "no-store"})

    @pages.get("/api/models.json")
    def models_json() -> JSONResponse:
        choices, default = _models()
        return JSONResponse({"default": default, "models": choices}, headers={"Cache-Control": "no-store"})

    @pages.get("/reports/{path:path}")
    def report(path: str, model: str | None = None) -> Response:
        from closedloop.stages import health

        current, _ = _choose(model)
        try:
            body, media = health.report_bytes(_runtime(current["name"]), path)
        except health.ReportNotFound as exc:
            raise HTTPException(404, str(exc)) from None
        return Response(body, media_type=media, headers={"Cache-Control": "no-store"})

    @app.get("/metrics", dependencies=[Depends(prometheus)])
    def metrics() -> Response:
        from closedloop.adapters import exporter

        try:
            body = exporter.exposition_models(_runtime)
        except Exception as exc:  # the exporter's boundary: Prometheus records the failed scrape (up == 0)
            log.exception("model health: could not gather the loop's metrics")
            raise HTTPException(503, f"loop metrics unavailable: {type(exc).__name__} while reading the MLflow "
                                     "registry or the lake (details in the API server's log)") from None
        return Response(body, media_type=exporter.CONTENT_TYPE, headers={"Cache-Control": "no-store"})

    app.include_router(pages)
    return app


class LazyApp:
    """An ASGI app that builds :func:`build_app` on its first call (what the API server mounts)."""

    def __init__(self) -> None:
        self._app: Any = None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if self._app is None:
            self._app = build_app()
        await self._app(scope, receive, send)


app = LazyApp()


class ModelHealthPlugin(AirflowPlugin):
    name = "closedloop_model_health"
    fastapi_apps = [{"app": app, "url_prefix": URL_PREFIX, "name": "closedloop model health"}]
    external_views = [{
        "name": "Model health",
        "href": URL_PREFIX.lstrip("/") + "/",  # relative to the UI's base URL (its <base href>)
        "url_route": "model-health",           # shown at /plugin/model-health, in an iframe
        "destination": "nav",
        "category": "browse",
    }]
