"""rackserve's ingress: Ray Serve LLM's `OpenAiIngress`, with a prompt 503 for a model that is down.

Serve's handle holds a request for an engine with no running replica until one starts, so a
client of a lost model would wait for its own timeout (or Serve LLM's 600 s). This ingress keeps
a view of which engine applications have a RUNNING replica (Serve's status, refreshed every
`STATUS_MAX_AGE_S`) and answers a request for a model without one at once, and a request
already waiting as soon as its model is seen down, with an OpenAI-style 503 naming the model.
Other models are not touched. An unknown view (Serve's controller away) lets requests through.

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

from deployer.serving.applications import running_engines

STATUS_MAX_AGE_S = 2.0
"""How old the view of running engines may be before a refresh starts."""
STATUS_WAIT_S = 0.5
"""How long a request waits for a refresh in flight before using the view it has."""
STATUS_STALE_S = 10.0
"""A view not refreshed for this long is unknown (the controller away): requests go through."""
WAIT_CHECK_S = 1.0
"""How often a request waiting for its first answer checks that its model is still up."""


class RackserveIngress(OpenAiIngress):
    """`OpenAiIngress` that refuses, with a 503, requests for a model with no running engine."""

    def __init__(self, llm_deployments: Mapping[str, Any], model_cards: Mapping[str, Any]) -> None:
        super().__init__(dict(llm_deployments), dict(model_cards))
        self._app_of = {model_id: h.app_name for model_id, h in llm_deployments.items()}
        self._running: frozenset[str] = frozenset()
        self._seen = float("-inf")
        self._asked = float("-inf")
        self._refresh: asyncio.Future[None] | None = None

    async def _refresh_view(self) -> None:
        try:
            found = await asyncio.to_thread(serve.status)
        except Exception:  # the controller away: the view ages into unknown
            return
        finally:
            self._refresh = None
        self._running = running_engines(found.applications)
        self._seen = time.monotonic()

    async def _running_apps(self) -> frozenset[str] | None:
        """Serve's engines with a running replica, or None when unknown.

        One refresh runs at a time, in a thread; a request waits for it at most STATUS_WAIT_S.
        While Serve's controller is away (the head restarting) `serve.status` can block for as
        long: requests then go through on the last view, and on none once it is STATUS_STALE_S
        old, so the replicas that outlive the head keep answering through their node's proxy.
        """
        now = time.monotonic()
        if self._refresh is None and now - self._asked >= STATUS_MAX_AGE_S:
            self._asked = now
            self._refresh = asyncio.ensure_future(self._refresh_view())
        if self._refresh is not None:
            await asyncio.wait({self._refresh}, timeout=STATUS_WAIT_S)
        if time.monotonic() - self._seen > STATUS_STALE_S:
            return None
        return self._running

    async def _refuse_if_down(self, model_id: str) -> None:
        app = self._app_of.get(get_base_model_id(model_id))
        running = await self._running_apps()
        if app is None or running is None or app in running:
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
