"""API keys at the endpoint: an ASGI middleware in the ingress application, before any route.

Every request must carry `Authorization: Bearer KEY` with a key of the key file
(`deployer.serving.key_file`, reread when it changes, so a revoked key is refused from the next
request on). A missing, malformed or unknown key gets a 401 with an OpenAI-shaped error body;
the request never reaches a route, so it is refused the same way whatever its body. The key
found is left in the request's state (`CALLER`), where the ingress checks its allow-list and
counts its requests and tokens (`deployer.serving.ingress`).

Nothing a client sends is echoed: the messages name what is wrong, never the key given, and
metrics are labelled with the key's name only.

Imports Starlette and Ray at the top: only `applications.ingress_application` imports it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray.serve.metrics import Counter
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from deployer.config.api_keys import bearer_token
from deployer.serving.key_file import KeyFileWatcher

CALLER = "rackserve_api_key"
"""The key of the request (`ApiKey`), in `request.state`; absent when auth is off."""

REFUSED_METRIC = "rackserve_api_refused"
REQUESTS_METRIC = "rackserve_api_requests"
TOKENS_METRIC = "rackserve_api_tokens"


def openai_error(status: int, message: str, error_type: str, code: str) -> JSONResponse:
    """An error response shaped as OpenAI's: `{"error": {message, type, param, code}}`."""
    body = {"error": {"message": message, "type": error_type, "param": None, "code": code}}
    return JSONResponse(body, status_code=status)


def unauthorized(reason: str) -> JSONResponse:
    """The 401 for a request without a usable key (`reason`: missing, malformed, unknown)."""
    messages = {
        "missing": "no API key: send the header `Authorization: Bearer KEY`",
        "malformed": "the Authorization header is not `Bearer KEY` with one key",
        "unknown": "the API key is not valid (wrong, or revoked); ask the rack's operator",
    }
    response = openai_error(401, messages[reason], "invalid_request_error", "invalid_api_key")
    response.headers["WWW-Authenticate"] = "Bearer"
    return response


class ApiKeyMiddleware:
    """Refuses a request without a valid key; leaves the key found in the request's state."""

    def __init__(self, app: ASGIApp, key_file: str) -> None:
        self.app = app
        self.keys = KeyFileWatcher(Path(key_file))
        self.refused = Counter(
            REFUSED_METRIC,
            description="Requests refused at the endpoint for want of a valid API key.",
            tag_keys=("reason",),
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = Headers(scope=scope).get("authorization")
        token = bearer_token(header)
        key = None if token is None else self.keys.current().find(token)
        if key is None:
            reason = "missing" if header is None else "malformed" if token is None else "unknown"
            self.refused.inc(tags={"reason": reason})
            await unauthorized(reason)(scope, receive, send)
            return
        state: dict[str, Any] = scope.setdefault("state", {})
        state[CALLER] = key
        await self.app(scope, receive, send)
