"""Transport limits of every Tessera HTTP app: a request body must arrive within `timeout_s` of each
previous part (a client that stalls its body gets 408 and the connection is closed, instead of holding
a server slot forever). Header size is bounded by the server (`serve.app.run_server`)."""
from __future__ import annotations

import asyncio
import json

BODY_TIMEOUT_S = 30.0


class BodyReadTimeout:
    """Pure ASGI middleware: only the reads of a request's body are timed; once the body is complete,
    `receive` is the server's own again (streaming responses wait on it for the disconnect). On a stall it
    answers 408 itself and tells the app the client left (whatever the app answers then is dropped)."""

    def __init__(self, app, timeout_s: float | None = None):
        self.app, self.timeout_s = app, timeout_s or BODY_TIMEOUT_S

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = {"body_done": scope.get("method") in ("GET", "HEAD", "OPTIONS", "DELETE"), "timed_out": False}

        async def timed_receive():
            if state["body_done"]:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.timeout_s)
            except asyncio.TimeoutError:
                state["body_done"] = state["timed_out"] = True
                await _send_408(send, self.timeout_s)
                return {"type": "http.disconnect"}
            if message["type"] != "http.request" or not message.get("more_body", False):
                state["body_done"] = True
            return message

        async def guarded_send(message):
            if not state["timed_out"]:
                await send(message)

        await self.app(scope, timed_receive, guarded_send)


async def _send_408(send, timeout_s: float) -> None:
    body = json.dumps({"error": {"message": f"the request body did not arrive within {timeout_s:g} s",
                                 "type": "invalid_request_error", "param": None, "code": "request_timeout"}}).encode()
    await send({"type": "http.response.start", "status": 408,
                "headers": [(b"content-type", b"application/json"), (b"connection", b"close"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
