"""A client loop for fault tests and the recovery benchmark: every answer counted, per model.

A thread per model sends one-token chat requests to the OpenAI endpoint throughout a fault and
records when each answered request was sent, and why each failed one failed (HTTP status and
the error's message, or the socket error: `TimeoutError` is a request that waited out its
timeout, `REQUEST_TIMEOUT_S` unless given). The stand-in engine's refusal (HTTP 501 naming the
stand-in) counts as an answer: it went through the proxy, the ingress and a live engine replica
and back.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from tools.local_ray import HEAD_IP

REQUEST_TIMEOUT_S = 10.0


@dataclass
class Counts:
    """Every request's outcome for one model, with when it was sent."""

    answered: list[float] = field(default_factory=list)
    failed: list[tuple[float, str]] = field(default_factory=list)
    slowest: tuple[float, float] = (0.0, 0.0)
    """The answered request that took longest: (seconds it took, when it was sent)."""

    def failures_by_reason(self, since: float) -> dict[str, tuple[int, float, float]]:
        """Per distinct failure: (count, first sent, last sent), in seconds after `since`."""
        grouped: dict[str, tuple[int, float, float]] = {}
        for sent, why in self.failed:
            count, first, _ = grouped.get(why, (0, sent - since, 0.0))
            grouped[why] = (count + 1, first, sent - since)
        return grouped


def ask(
    port: int,
    model_id: str,
    host: str = HEAD_IP,
    timeout_s: float = REQUEST_TIMEOUT_S,
    api_key: str | None = None,
) -> str | None:
    """One chat request; None when the model's engine answered, else what went wrong."""
    headers = {"Content-Type": "application/json"}
    if api_key is not None:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(
        f"http://{host}:{port}/v1/chat/completions",
        data=json.dumps(
            {"model": model_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
        ).encode(),
        headers=headers,
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return None if response.status == 200 else f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        body = exc.read().decode(errors="replace")
        if exc.code == 501 and "stand-in engine" in body:
            return None
        try:
            message = str(json.loads(body)["error"]["message"])
        except (ValueError, KeyError, TypeError):
            message = body[:200]
        # Serve LLM wraps every error as "Message: <ours> (Request ID: ...), Internal exception..."
        message = message.removeprefix("Message: ").split(" (Request ID:")[0]
        return f"HTTP {exc.code}: {message}"
    except OSError as exc:  # refused, reset, timed out
        return type(exc).__name__


class ClientLoop:
    """A thread per model sending requests one after another until stopped (at most 10,000).

    `pause_s` between requests keeps a real engine on two cores from being starved by the
    client itself; a failed request is followed by at least 0.2 s.
    """

    def __init__(
        self,
        port: int,
        model_ids: list[str],
        pause_s: float = 0.0,
        host: str = HEAD_IP,
        timeout_s: float = REQUEST_TIMEOUT_S,
        api_key: str | None = None,
    ) -> None:
        self.counts = {m: Counts() for m in model_ids}
        self._api_key = api_key
        self._pause_s = pause_s
        self._host = host
        self._timeout_s = timeout_s
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(port, m), daemon=True) for m in model_ids
        ]

    def _run(self, port: int, model_id: str) -> None:
        counts = self.counts[model_id]
        for _ in range(10_000):
            if self._stop.is_set():
                return
            sent = time.monotonic()
            problem = ask(port, model_id, self._host, self._timeout_s, self._api_key)
            if problem is None:
                counts.answered.append(sent)
                counts.slowest = max(counts.slowest, (time.monotonic() - sent, sent))
            else:
                counts.failed.append((sent, problem))
            self._stop.wait(self._pause_s if problem is None else max(self._pause_s, 0.2))

    def __enter__(self) -> ClientLoop:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self._timeout_s + 5)

    def wait_answered(self, model_id: str, after: float, timeout_s: float) -> float:
        """When `model_id` first answered a request sent after `after`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            later = [t for t in self.counts[model_id].answered if t > after]
            if later:
                return later[0]
            time.sleep(0.5)
        raise TimeoutError(f"{model_id} did not answer within {timeout_s:.0f} s")


def wait_answering(port: int, model_ids: list[str], timeout_s: float, host: str = HEAD_IP) -> float:
    """Until every model's engine answers one request through the endpoint; return when."""
    deadline = time.monotonic() + timeout_s
    for model_id in model_ids:
        while (problem := ask(port, model_id, host)) is not None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{model_id} never answered: {problem}")
            time.sleep(1)
    return time.monotonic()
