"""The API's description: /openapi.json as the server really behaves, and its docs pages.

The schema is completed at the first request, once the model is loaded: `n` and `steps` get the
served model's maximums, integers keep their exact values (FastAPI writes bounds as floats, and
2**63 - 1 as a float is 2**63, which the server refuses), and without API keys it declares no
security and no 401s. /docs and /redoc load their scripts from this server (the files of the
fastapi-offline package), not from a CDN, so they work offline. They are public, like the
page: the description holds no secret, and clients need it to find their way.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from server.api.openai import size_of
from server.contract import MAX_SEED
from server.settings import Settings

ASSETS = "/docs-assets"


def install_docs(app: FastAPI, settings: Settings) -> None:
    """Call with FastAPI(docs_url=None, redoc_url=None, openapi_url="/openapi.json")."""
    app.mount(ASSETS, StaticFiles(directory=str(files("fastapi_offline") / "static")), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def swagger() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{app.title} - docs",
                                   swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{ASSETS}/swagger-ui.css", swagger_favicon_url=f"{ASSETS}/favicon.png")

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url=app.openapi_url, title=f"{app.title} - reference",
                              redoc_js_url=f"{ASSETS}/redoc.standalone.js", redoc_favicon_url=f"{ASSETS}/favicon.png",
                              with_google_fonts=False)

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            state = getattr(app.state, "server", None)
            if state is None:
                return schema  # not started: no model limits to state yet, so nothing to cache
            for body in request_bodies(schema):
                body["n"]["maximum"] = state.limits.max_images_per_request
                body["steps"]["maximum"] = state.limits.num_timesteps
                body["seed"]["maximum"] = MAX_SEED
                for name in ("n", "steps", "seed"):
                    body[name]["minimum"] = int(body[name]["minimum"])
                if "size" in body:  # the /v1 routes: the one size this model makes, or "auto"
                    body["size"]["anyOf"][0]["enum"] = [size_of(state), "auto"]
            if not settings.auth_enabled:
                drop_security(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def request_bodies(schema: dict) -> list[dict]:
    """The properties of every generation request body (GenerateRequest, JobRequest, ...)."""
    return [component["properties"] for component in schema["components"]["schemas"].values()
            if {"n", "steps", "seed"} <= set(component.get("properties", {}))]


def drop_security(schema: dict) -> None:
    schema["components"].pop("securitySchemes", None)
    for operations in schema["paths"].values():
        for operation in operations.values():
            operation.pop("security", None)
            operation.get("responses", {}).pop("401", None)
