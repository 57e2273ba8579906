"""The HTTP server under the app: errors aiohttp answers itself use the JSON envelope.

A request aiohttp cannot parse (a bad request line, too many or too long headers)
never reaches the application or its middleware; aiohttp's protocol handler answers it
directly, in text/plain. `Runner` serves the app with a handler that answers those in
`{"error": {"code", "message"}}` like every other error.
"""

from __future__ import annotations

from http import HTTPStatus

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_server import Server

_CODES = {
    400: "BAD_REQUEST",
    413: "PAYLOAD_TOO_LARGE",
    431: "BAD_REQUEST",
    500: "INTERNAL",
    504: "TIMEOUT",
}
_MESSAGE_CHARS = 200


def protocol_error_body(status: int, message: str | None) -> bytes:
    """The envelope for an error aiohttp detected before the application ran."""
    if status >= 500 or not message:
        text = _phrase(status)
    else:
        text = f"the request is not valid HTTP: {message[:_MESSAGE_CHARS]}"
    code = _CODES.get(status, "HTTP_ERROR")
    return orjson.dumps({"error": {"code": code, "message": text}})


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "error"


class _JsonErrorRequestHandler(RequestHandler):
    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        # aiohttp's own handling logs the error and refuses when a response has started.
        super().handle_error(request, status, exc, message)
        response = web.Response(
            status=status,
            body=protocol_error_body(status, message),
            content_type="application/json",
        )
        response.force_close()
        return response


class _JsonErrorServer(Server):
    def __call__(self) -> RequestHandler:
        return _JsonErrorRequestHandler(self, loop=self._loop, **self._kwargs)


class Runner(web.AppRunner):
    """An `AppRunner` whose connections answer protocol errors in the JSON envelope."""

    async def _make_server(self) -> Server:
        server = await super()._make_server()
        server.__class__ = _JsonErrorServer
        return server
