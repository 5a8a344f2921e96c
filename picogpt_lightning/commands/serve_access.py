"""Who may use `serve`: an API key every /v1 request must bear (OpenAI's `Authorization: Bearer KEY`), and
FastAPI's schema pages left out unless asked for, so a public address shows nothing but the API."""

import hmac
import os
import sys
from typing import Optional

from fastapi import Request
from fastapi.responses import JSONResponse

from picogpt_lightning.commands.serve_api import error_body

API_KEY_VARIABLE = "PICOGPT_API_KEY"  # the key, where a flag would show it in the process list
SCHEMA_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")
PUBLIC_HOSTS = ("0.0.0.0", "::")


def resolve_api_key(api_key: Optional[str]) -> Optional[str]:
    return api_key or os.environ.get(API_KEY_VARIABLE) or None


def guard(app, api_key: Optional[str], host: str, schema_pages: bool) -> None:
    """Requires `api_key` on /v1 (a 401 in OpenAI's shape without it), drops the schema pages unless
    `schema_pages`, and warns when every interface listens with no key."""
    if not schema_pages:
        app.router.routes = [route for route in app.router.routes if getattr(route, "path", None) not in SCHEMA_PATHS]
        app.openapi_url = app.docs_url = app.redoc_url = None
    if api_key is None:
        if host in PUBLIC_HOSTS:
            print(f"warning: serving on every interface ({host}) without an API key: anyone who reaches this port "
                  f"can use it; pass --api_key or set {API_KEY_VARIABLE}", file=sys.stderr, flush=True)
        return
    expected = f"Bearer {api_key}".encode()

    @app.middleware("http")
    async def require_api_key(request: Request, call_next):
        if request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected):  # constant time: the key cannot be guessed byte by byte
                body = error_body("a valid API key is required: send the header Authorization: Bearer <key>",
                                  code="invalid_api_key")
                return JSONResponse(body, status_code=401)
        return await call_next(request)
