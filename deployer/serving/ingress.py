"""rackserve's ingress: Ray Serve LLM's `OpenAiIngress`, routing each model to its serving engine.

A model's engine runs in one of two Serve applications (`applications.model_app_name` slots):
a make-before-break move starts the new engine in the other slot, and both run until the
ingress routes to the new one. The ingress watches Serve's status (every `ROUTE_REFRESH_S`, in
the background, reading the controller's details as plain data) and routes each model to its
newest engine application with a running replica that is not being deleted; a deploy waits
`ROUTE_SETTLE_S` after the new engine runs before it deletes the old one, so no request
reaches an engine that is stopping.

Serve's handle holds a request for an engine with no running replica until one starts, so a
client of a lost model would wait for its own timeout (or Serve LLM's 600 s). A model with no
running engine is answered at once, and a request already waiting as soon as its model is seen
down, with an OpenAI-style 503 naming the model. Other models are not touched. A view not
refreshed for `STATUS_STALE_S` (Serve's controller away, the head restarting) lets requests
through to the last engine seen serving, so replicas that outlive the head keep answering.

With API keys on (`deployer.serving.auth` checked the key before any route), a model outside
the key's allow-list is answered 404, as a model that does not exist is (its existence is not
told), and `/v1/models` lists only the key's models. Each key's requests and tokens are counted
per model (`rackserve_api_requests`, `rackserve_api_tokens` by kind: prompt or completion);
tokens come from the engine's `usage`, which a stream is asked for and which is then removed
from the stream unless the client asked for it.

This module imports Ray at the top: only `applications.ingress_application` imports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncGenerator, Mapping
from typing import Any

from fastapi import status
from ray import serve
from ray.llm._internal.common.utils.lora_utils import get_base_model_id
from ray.llm._internal.serve.core.configs.openai_api_models import (
    ModelCard,
    ModelList,
    OpenAIHTTPException,
)
from ray.serve.context import _get_global_client
from ray.serve.llm.ingress import OpenAiIngress
from ray.serve.metrics import Counter
from starlette.requests import Request

from deployer.config.api_keys import ApiKey
from deployer.serving.applications import (
    ENGINE_DEPLOYMENT,
    ROUTE_REFRESH_S,
    ApplicationView,
    applications_from_details,
    serving_routes,
)
from deployer.serving.auth import CALLER, REQUESTS_METRIC, TOKENS_METRIC

STATUS_TIMEOUT_S = 5.0
"""A status read that takes longer is abandoned (the controller away) and tried again."""
STATUS_STALE_S = 10.0
"""A view not refreshed for this long is unknown (the controller away): requests go through."""
WAIT_CHECK_S = 1.0
"""How often a request waiting for its first answer checks that its model is still up."""


class RackserveIngress(OpenAiIngress):
    """`OpenAiIngress` following each model to its serving engine; 503 for a model with none."""

    def __init__(self, llm_deployments: Mapping[str, Any], model_cards: Mapping[str, Any]) -> None:
        super().__init__(dict(llm_deployments), dict(model_cards))
        self._handles: dict[str, Any] = {h.app_name: h for h in llm_deployments.values()}
        self._routes: dict[str, str | None] = {m: h.app_name for m, h in llm_deployments.items()}
        self._last: dict[str, str] = {m: h.app_name for m, h in llm_deployments.items()}
        self._configured: dict[tuple[str, str], Any] = {}
        self._seen = float("-inf")
        self._watch: asyncio.Task[None] | None = None
        self._requests = Counter(
            REQUESTS_METRIC,
            description="Requests to a model, by API key name.",
            tag_keys=("key", "model"),  # type: ignore[arg-type]  # Ray's hint: tuple[str]
        )
        self._tokens = Counter(
            TOKENS_METRIC,
            description="Tokens of a model's requests (kind: prompt, completion), by API key.",
            tag_keys=("key", "model", "kind"),  # type: ignore[arg-type]
        )

    def _watching(self) -> None:
        if self._watch is None or self._watch.done():
            self._watch = asyncio.ensure_future(self._watch_routes())

    async def _watch_routes(self) -> None:
        while True:
            with contextlib.suppress(Exception):  # the controller away: the view ages
                found = await asyncio.wait_for(
                    asyncio.to_thread(serve_applications), timeout=STATUS_TIMEOUT_S
                )
                self._routes = serving_routes(found, list(self._last))
                self._last |= {m: a for m, a in self._routes.items() if a is not None}
                self._seen = time.monotonic()
            await asyncio.sleep(ROUTE_REFRESH_S)

    async def check_health(self) -> None:
        """Serve's periodic health check; starts the route watch if it is not running."""
        self._watching()

    def _route(self, model_id: str) -> str | None:
        """The engine application for a base model id; None: known to have no running engine."""
        if time.monotonic() - self._seen > STATUS_STALE_S:
            return self._last.get(model_id)
        return self._routes.get(model_id)

    def _get_configured_serve_handle(self, model_id: str) -> Any:
        base = get_base_model_id(model_id)
        app = self._route(base) or self._last.get(base)
        if app is None:  # not one of ours: OpenAiIngress's own 404
            return super()._get_configured_serve_handle(model_id)
        key = (model_id, app)
        if key not in self._configured:
            if app not in self._handles:
                self._handles[app] = serve.get_deployment_handle(ENGINE_DEPLOYMENT, app_name=app)
            options: dict[str, Any] = {"stream": True}
            if model_id != base:  # a LoRA adapter: Serve's multiplexed routing
                options["multiplexed_model_id"] = model_id
            self._configured[key] = self._handles[app].options(**options)
        return self._configured[key]

    async def _refuse_if_down(self, model_id: str) -> None:
        self._watching()
        base = get_base_model_id(model_id)
        if base not in self._last or self._route(base) is not None:
            return
        raise OpenAIHTTPException(
            status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
            message=(
                f"model {model_id!r} is not serving: its engine has no running replica "
                "(restarting, or its node was lost); the other models are unaffected. "
                "Retry later; `rackserve status` shows it."
            ),
            type="ServiceUnavailable",
        )

    # FastAPI passes the request to a route that asks for it: these two routes take it.
    async def models(self, request: Request) -> ModelList:  # type: ignore[override]
        """`/v1/models`: every model, or with API keys only those the key may use."""
        listed = await super().models()
        key = caller(request)
        if key is None:
            return listed
        return ModelList(data=[card for card in listed.data if key.allows(card.id)])

    async def model_data(self, model: str, request: Request) -> ModelCard:  # type: ignore[override]
        """`/v1/models/{model}`: 404 for a model the key may not use, as for an unknown one."""
        key = caller(request)
        if key is not None and not key.allows(model):
            raise not_found(model)
        card: ModelCard = await super().model_data(model)
        return card

    async def _get_response(
        self, *, body: Any, call_method: str, raw_request: Any = None
    ) -> AsyncGenerator[Any, None]:
        model_id = await self._get_model_id(body.model)
        key = caller(raw_request)
        if key is not None:
            if not key.allows(model_id):
                raise not_found(model_id)
            self._requests.inc(tags={"key": key.name, "model": model_id})
            async for item in self._counted(key, model_id, body, call_method, raw_request):
                yield item
            return
        async for item in self._answered(model_id, body, call_method, raw_request):
            yield item

    async def _counted(
        self, key: ApiKey, model_id: str, body: Any, call_method: str, raw_request: Any
    ) -> AsyncGenerator[Any, None]:
        """The answer, with its usage counted for the key (asked of a stream, then removed)."""
        hide_usage = False
        if getattr(body, "stream", False) and hasattr(body, "stream_options"):
            options = body.stream_options
            if options is None or not getattr(options, "include_usage", False):
                body = body.model_copy(update={"stream_options": {"include_usage": True}})
                body = type(body).model_validate(body.model_dump())
                hide_usage = True
        async for item in self._answered(model_id, body, call_method, raw_request):
            for usage in usages(item):
                self._count_usage(key, model_id, usage)
            kept = without_usage_chunks(item) if hide_usage else item
            if kept is not None:
                yield kept

    def _count_usage(self, key: ApiKey, model_id: str, usage: Mapping[str, Any]) -> None:
        for kind in ("prompt", "completion"):
            tokens = usage.get(f"{kind}_tokens")
            if isinstance(tokens, int) and tokens > 0:
                tags = {"key": key.name, "model": model_id, "kind": kind}
                self._tokens.inc(tokens, tags=tags)

    async def _answered(
        self, model_id: str, body: Any, call_method: str, raw_request: Any
    ) -> AsyncGenerator[Any, None]:
        await self._refuse_if_down(model_id)
        inner = super()._get_response(body=body, call_method=call_method, raw_request=raw_request)
        first = asyncio.ensure_future(anext(inner))
        try:
            while not first.done():
                await asyncio.wait({first}, timeout=WAIT_CHECK_S)
                if not first.done():
                    await self._refuse_if_down(model_id)
        except BaseException:
            first.cancel()
            with contextlib.suppress(BaseException):
                await first
            await inner.aclose()
            raise
        try:
            item = first.result()
        except StopAsyncIteration:
            return
        yield item
        async for item in inner:
            yield item


def serve_applications() -> dict[str, ApplicationView]:
    """Serve's applications, read from the controller as `serve.status()` reads them, unvalidated.

    Raises when the controller cannot be reached (the watch then keeps its last view).
    """
    client = _get_global_client()
    if client is None:  # not raised when Serve has no controller: it has no applications either
        return {}
    return applications_from_details(client.get_serve_details())


def caller(request: Any) -> ApiKey | None:
    """The request's API key, as `auth.ApiKeyMiddleware` left it; None when auth is off."""
    if request is None:
        return None
    key = request.scope.get("state", {}).get(CALLER)
    return key if isinstance(key, ApiKey) else None


def not_found(model_id: str) -> OpenAIHTTPException:
    """The answer for a model a key may not use: the same as for a model that does not exist."""
    return OpenAIHTTPException(
        status_code=status.HTTP_404_NOT_FOUND,
        message=f"The model {model_id!r} does not exist or this API key may not use it.",
        type="NotFoundError",
    )


def _events(item: Any) -> list[Any]:
    """A stream item's events: Serve LLM yields an event, a list of them, or SSE text."""
    return item if isinstance(item, list) else [item]


def usages(item: Any) -> list[Mapping[str, Any]]:
    """The `usage` objects in an answer or stream item (pydantic, dict or SSE text)."""
    found: list[Mapping[str, Any]] = []
    for event in _events(item):
        if isinstance(event, str):
            for data in _sse_data(event):
                if isinstance(data, dict) and isinstance(data.get("usage"), dict):
                    found.append(data["usage"])
            continue
        usage = event.get("usage") if isinstance(event, dict) else getattr(event, "usage", None)
        if usage is not None and hasattr(usage, "model_dump"):
            usage = usage.model_dump()
        if isinstance(usage, dict):
            found.append(usage)
    return found


def _sse_data(text: str) -> list[Any]:
    parsed = []
    for block in text.split("\n\n"):
        payload = block.strip().removeprefix("data:").strip()
        if payload.startswith("{") and '"usage"' in payload:
            with contextlib.suppress(ValueError):
                parsed.append(json.loads(payload))
    return parsed


def _usage_only(data: Any) -> bool:
    if hasattr(data, "model_dump"):
        data = data.model_dump()
    return isinstance(data, dict) and not data.get("choices") and bool(data.get("usage"))


def without_usage_chunks(item: Any) -> Any:
    """A stream item without the usage-only chunk that was asked for on the client's behalf.

    The other chunks keep their own `usage` field, as vLLM sends it (null unless asked).
    Returns None when nothing is left.
    """
    kept: list[Any] = []
    for event in _events(item):
        if isinstance(event, str):
            blocks = [
                block + "\n\n"
                for block in event.split("\n\n")
                if block.strip() and not any(_usage_only(d) for d in _sse_data(block))
            ]
            if blocks:
                kept.append("".join(blocks))
        elif not _usage_only(event):
            kept.append(event)
    if not kept:
        return None
    return kept if isinstance(item, list) else kept[0]
