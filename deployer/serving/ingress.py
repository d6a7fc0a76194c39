"""rackserve's ingress: Ray Serve LLM's `OpenAiIngress`, routing each model to its serving engine.

A model's engine runs in one of two Serve applications (`applications.model_app_name` slots):
a make-before-break move starts the new engine in the other slot, and both run until the
ingress routes to the new one. The ingress watches Serve's status (every `ROUTE_REFRESH_S`, in
the background) and routes each model to its newest engine application with a running replica
that is not being deleted; a deploy waits `ROUTE_SETTLE_S` after the new engine runs before it
deletes the old one, so no request reaches an engine that is stopping.

Serve's handle holds a request for an engine with no running replica until one starts, so a
client of a lost model would wait for its own timeout (or Serve LLM's 600 s). A model with no
running engine is answered at once, and a request already waiting as soon as its model is seen
down, with an OpenAI-style 503 naming the model. Other models are not touched. A view not
refreshed for `STATUS_STALE_S` (Serve's controller away, the head restarting) lets requests
through to the last engine seen serving, so replicas that outlive the head keep answering.

This module imports Ray at the top: only `applications.ingress_application` imports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Mapping
from typing import Any

from fastapi import status
from ray import serve
from ray.llm._internal.common.utils.lora_utils import get_base_model_id
from ray.llm._internal.serve.core.configs.openai_api_models import OpenAIHTTPException
from ray.serve.llm.ingress import OpenAiIngress

from deployer.serving.applications import (
    ENGINE_DEPLOYMENT,
    ROUTE_REFRESH_S,
    serving_routes,
)

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

    def _watching(self) -> None:
        if self._watch is None or self._watch.done():
            self._watch = asyncio.ensure_future(self._watch_routes())

    async def _watch_routes(self) -> None:
        while True:
            with contextlib.suppress(Exception):  # the controller away: the view ages
                found = await asyncio.wait_for(
                    asyncio.to_thread(serve.status), timeout=STATUS_TIMEOUT_S
                )
                self._routes = serving_routes(found.applications, list(self._last))
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

    async def _get_response(
        self, *, body: Any, call_method: str, raw_request: Any = None
    ) -> AsyncGenerator[Any, None]:
        model_id = await self._get_model_id(body.model)
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
