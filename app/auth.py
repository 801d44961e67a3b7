"""Password login that slows down guessing: each client gets a few free wrong passwords, then waits 1, 2, 4 ...
seconds (at most a minute) before the next one is even checked.

Written by hand because Gradio checks `--auth` credentials as fast as they arrive (100 wrong passwords were checked
at 461 per second) and has no hook for it. The throttle is an ASGI middleware on Gradio's own `/login` route, passed
to its FastAPI app through `launch(app_kwargs=...)`. The client is the address uvicorn reports: the socket's peer,
unless the person running the app named a trusted reverse proxy (`--trusted-proxy`), whose X-Forwarded-For then
names the client. uvicorn trusts that header from 127.0.0.1 by default, so any local process (or a proxy that
passes the header on unchecked) rotated it and got a fresh client for every guess (issue 23):
`trust_forwarded_for()` sets what uvicorn trusts before the server starts.
"""
from __future__ import annotations

import json
import os
import threading
import time
from typing import Callable

MAX_CLIENTS = 10_000  # remembered failing addresses; the oldest are forgotten first


class LoginThrottle:
    """Failures per client and how long each must wait before its next try (exponential backoff)."""

    def __init__(self, free_failures: int = 5, first_wait: float = 1.0, max_wait: float = 60.0,
                 clock: Callable[[], float] = time.monotonic):
        self.free_failures, self.first_wait, self.max_wait, self.clock = free_failures, first_wait, max_wait, clock
        self._failures: dict[str, tuple[int, float]] = {}  # client -> (failures, time of the last one)
        self._lock = threading.Lock()

    def wait_seconds(self, client: str) -> float:
        """0 when this client may try now, else the seconds until it may."""
        with self._lock:
            count, last = self._failures.get(client, (0, 0.0))
        if count < self.free_failures:
            return 0.0
        wait = min(self.max_wait, self.first_wait * 2 ** min(count - self.free_failures, 16))
        return max(0.0, last + wait - self.clock())

    def failed(self, client: str) -> None:
        with self._lock:
            count, _ = self._failures.pop(client, (0, 0.0))
            self._failures[client] = (count + 1, self.clock())  # re-inserted: dicts keep the newest last
            while len(self._failures) > MAX_CLIENTS:
                self._failures.pop(next(iter(self._failures)))

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._failures.pop(client, None)


class ThrottledLogin:
    """ASGI middleware: a POST to /login from a client that must wait gets 429 unchecked; every checked try counts
    as a failure until it answers 200 (which clears the client's record)."""

    def __init__(self, app, throttle: LoginThrottle):
        self.app, self.throttle = app, throttle

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"].rstrip("/").split("/")[-1] != "login":
            return await self.app(scope, receive, send)
        client = (scope.get("client") or ("unknown", 0))[0]
        wait = self.throttle.wait_seconds(client)
        if wait > 0:
            return await _too_many(send, wait)
        self.throttle.failed(client)  # counted before it is checked: guesses sent all at once count too
        status = {}

        async def record(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        await self.app(scope, receive, record)
        if status.get("code") == 200:
            self.throttle.succeeded(client)


async def _too_many(send, wait: float) -> None:
    seconds = max(1, round(wait))
    body = json.dumps({"detail": f"Too many wrong passwords: try again in {seconds} s."}).encode()
    await send({"type": "http.response.start", "status": 429,
                "headers": [(b"content-type", b"application/json"), (b"retry-after", str(seconds).encode())]})
    await send({"type": "http.response.body", "body": body})


def app_kwargs(throttle: LoginThrottle | None = None) -> dict:
    """For Blocks.launch(app_kwargs=...): the login throttle as a middleware of Gradio's FastAPI app."""
    from starlette.middleware import Middleware
    return {"middleware": [Middleware(ThrottledLogin, throttle=throttle or LoginThrottle())]}


def trust_forwarded_for(proxies: str | None) -> None:
    """Before launch: uvicorn takes the client's address from X-Forwarded-For only when the connection comes from
    one of `proxies` (comma-separated addresses or networks); None: from nobody, so the throttle counts the
    socket's peer. Gradio starts uvicorn without a way to pass its forwarded_allow_ips, so this sets the
    environment variable uvicorn reads for it (FORWARDED_ALLOW_IPS; "" matches no address)."""
    os.environ["FORWARDED_ALLOW_IPS"] = ",".join(p.strip() for p in (proxies or "").split(",") if p.strip())
