"""What every HTTP service does before and after its handlers: bounded request bodies, and errors
that are JSON with a reason, never a stack trace.

* **Body limits** (`BodyGuard`, an ASGI middleware, and `read_body` for hand-written ASGI paths):
  a declared Content-Length above the limit is a 413 before a byte is read; a streamed body is cut
  off as soon as it passes the limit; a body that is not complete within `body_timeout` is a 408,
  so a slow or stalled client holds no worker. The whole body is buffered (it is bounded) and
  replayed to the app.
* **Error bodies** (`install_error_handlers`): a validation error lists type, location and message
  of each problem, without echoing the input. Echoing it is what turned bad input into 500s: bytes
  that are not UTF-8, lone surrogates and NaN cannot be written back as JSON. Anything unexpected is
  a JSON 500 (logged with its traceback).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

log = structlog.get_logger(__name__)

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]


class BodyRejectedError(Exception):
    """The request body broke a limit: `status` (413 or 408) and a reason for the client."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class ClientGoneError(Exception):
    """The client disconnected before its body was complete: nothing to answer."""


def declared_length(scope: MutableMapping[str, Any]) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def read_body(receive: Receive, limit: int, timeout_s: float, untimed_first: bool = False) -> bytes:
    """The whole request body, at most `limit` bytes, complete within `timeout_s`.

    `untimed_first` waits for the first piece without a timer (a timer costs microseconds, which
    the ranker's /rank path saves): a normal client's small body arrives with its headers, so the
    first piece is there at once, and a body that stops mid-way is still cut off by the timer. A
    client that sends headers and then nothing is left to the gateway's `timeout http-request`."""
    parts: list[bytes] = []
    size = 0

    def take(message: Message) -> bool:
        nonlocal size
        if message["type"] == "http.disconnect":
            raise ClientGoneError
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyRejectedError(413, f"request body larger than {limit} bytes")
        parts.append(chunk)
        return bool(message.get("more_body"))

    if untimed_first and not take(await receive()):
        return parts[0]
    try:
        async with asyncio.timeout(timeout_s):
            while take(await receive()):
                pass
    except TimeoutError:
        raise BodyRejectedError(408, f"request body not complete within {timeout_s:g} s") from None
    return b"".join(parts)


def json_bytes(document: Any) -> bytes:
    """JSON that always encodes: ASCII escapes for any string, repr for anything else."""
    return json.dumps(document, ensure_ascii=True, allow_nan=False, default=repr).encode()


async def send_json(
    send: Send, status: int, document: Any, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = json_bytes(document)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def check_body(
    scope: MutableMapping[str, Any],
    receive: Receive,
    send: Send,
    limit: int,
    timeout_s: float,
    untimed_first: bool = False,
) -> bytes | None:
    """The bounded body, or None after answering 413/408 (or when the client left)."""
    declared = declared_length(scope)
    try:
        if declared is not None and declared > limit:
            raise BodyRejectedError(
                413, f"request body larger than {limit} bytes (Content-Length {declared})"
            )
        return await read_body(receive, limit, timeout_s, untimed_first)
    except BodyRejectedError as exc:
        await send_json(send, exc.status, {"detail": exc.detail}, [(b"connection", b"close")])
    except ClientGoneError:
        pass
    return None


class BodyGuard:
    """ASGI middleware: every request body bounded in size and time before the app sees it."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, body_timeout_s: float) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body = await check_body(scope, receive, send, self.max_body_bytes, self.body_timeout_s)
        if body is None:
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as the server would

        await self.app(scope, replay, send)


def validation_problems(errors: Any) -> list[dict[str, Any]]:
    """Each problem as type, location and message; the offending input is not echoed back."""
    return [
        {
            "type": str(e.get("type")),
            "loc": [str(part) if not isinstance(part, int) else part for part in e.get("loc", ())],
            "msg": str(e.get("msg")),
        }
        for e in errors
    ]


def validation_error_body(errors: Any) -> bytes:
    return json_bytes({"detail": validation_problems(errors)})


def harden(app: FastAPI, max_body_bytes: int, body_timeout_s: float) -> None:
    """Both: bounded bodies before any handler, JSON errors after."""
    install_error_handlers(app)
    app.add_middleware(BodyGuard, max_body_bytes=max_body_bytes, body_timeout_s=body_timeout_s)


def install_error_handlers(app: FastAPI) -> None:
    """422s that always encode, and a JSON 500 for anything unexpected."""

    async def invalid(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return Response(validation_error_body(exc.errors()), status_code=422, media_type="application/json")

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled_error", path=request.url.path, error=repr(exc), exc_info=exc)
        return JSONResponse({"detail": "internal error"}, status_code=500)

    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(Exception, unexpected)
