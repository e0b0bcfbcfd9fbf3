"""HTTP plumbing under the routes: OpenAI's error object (`ApiError`), the strict JSON body parser, the
JSON-only route class, and the ASGI gate (API key, body-size limit, last word on unexpected errors)."""

from __future__ import annotations

import hmac
import ipaddress
import json
import math
import re
import sys
import traceback
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

DEFAULT_MAX_REQUEST_BYTES = 4 * 2**20
MAX_JSON_DEPTH = 64  # deep enough for any tool's JSON schema; deeper bodies are an attack, not a request


class ApiError(HTTPException):
    """A request the server refuses, answered with OpenAI's error object. An HTTPException, so that FastAPI
    passes it on unchanged when it is raised while the body is read (see JsonRequest)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(status, message, headers)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status, headers=self.headers, content={"error": {
            "message": self.message, "type": self.kind, "param": self.param, "code": self.code}})


_SURROGATE = re.compile("[\ud800-\udfff]")


def parse_json(body: bytes) -> Any:
    """The request body as JSON, held to what the server can take in every string and number: UTF-8,
    no NaN or Infinity (nor a number that overflows to it, like 1e999), no lone UTF-16 surrogate (a JSON
    escape such as \\ud800 that no text can hold: the tokenizer, the template and the response encoder all
    fail on it), and at most MAX_JSON_DEPTH levels of nesting. Raises ApiError(400)."""
    try:
        value = json.loads(body.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError as err:
        raise ApiError(400, f"the body is not valid UTF-8: {err}", code="invalid_json") from None
    except json.JSONDecodeError as err:
        raise ApiError(400, f"the body is not valid JSON: {err}", code="invalid_json") from None
    except ValueError as err:  # _no_constant, or an integer of more digits than Python converts
        raise ApiError(400, f"the body is not valid JSON: {err}", code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, f"the body nests deeper than {MAX_JSON_DEPTH} levels", code="invalid_json") from None
    pending: list[tuple[Any, tuple]] = [(value, ())]
    while pending:
        item, path = pending.pop()
        if isinstance(item, str):
            _check_text(item, path)
        elif isinstance(item, float) and not math.isfinite(item):
            raise ApiError(400, f"{_where(path)}: the number is out of range", _param(path), "invalid_value")
        elif isinstance(item, dict | list):
            if len(path) >= MAX_JSON_DEPTH:
                raise ApiError(400, f"the body nests deeper than {MAX_JSON_DEPTH} levels", code="invalid_json")
            children = item.items() if isinstance(item, dict) else enumerate(item)
            for key, child in children:
                if isinstance(key, str):
                    _check_text(key, path)
                if not isinstance(child, int | bool | None):  # the common leaves need no second look
                    pending.append((child, (*path, key)))
    return value


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _check_text(text: str, path: tuple) -> None:
    if _SURROGATE.search(text):
        raise ApiError(400, f"{_where(path)}: the text holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff "
                            "escape), which is no character", _param(path), "invalid_value")


def _param(path: tuple) -> str | None:
    return ".".join(map(str, path)) or None


def _where(path: tuple) -> str:
    return _param(path) or "body"


class JsonRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = await run_in_threadpool(parse_json, await self.body())  # a 4 MiB body takes a while
        return self._json


class JsonRoute(APIRoute):
    """A route whose body must be JSON (Content-Type application/json or +json: a web page cannot send that
    cross-site without the browser asking first), parsed by parse_json."""

    def get_route_handler(self):
        handler = super().get_route_handler()
        takes_body = self.body_field is not None

        async def route(request: Request) -> Response:
            if takes_body and not _is_json(request.headers.get("content-type", "")):
                raise ApiError(400, "the body must be JSON, sent with the header Content-Type: application/json "
                                    f"(got {request.headers.get('content-type', 'none')!r:.80})",
                               code="invalid_content_type")
            return await handler(JsonRequest(request.scope, request.receive))

        return route


def _is_json(content_type: str) -> bool:
    media_type = content_type.partition(";")[0].strip().lower()
    return media_type == "application/json" or (media_type.startswith("application/") and
                                                 media_type.endswith("+json"))


class Gate:
    """ASGI middleware: the API key, the body-size limit, and the last word on unexpected exceptions.

    A 401 or a 413 for a declared Content-Length is answered without reading the body (the server
    discards what the client still sends, and the connection stays open for its next request). A body
    without Content-Length (chunked) is counted as the app reads it: past the limit, reading it raises
    ApiError(413). An exception that escapes the app before the response started gets a 500 error object
    here, so the connection stays usable (Starlette's own handler re-raises, and uvicorn then drops it)."""

    def __init__(self, app, api_key: str | None, max_request_bytes: int):
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_request_bytes = max_request_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        path = scope["path"]
        if self.api_key is not None and is_protected(path) and not self._authorized(headers):
            return await ApiError(401, "the API key is missing or wrong: send the header Authorization: Bearer KEY",
                                  code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
                                  ).response()(scope, receive, send)
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_request_bytes:
            return await self._too_large().response()(scope, receive, send)

        received = 0

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_request_bytes:
                    raise self._too_large()
            return message

        started = False

        async def watched_send(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, watched_send)
        except Exception as err:
            if started:
                raise
            if not isinstance(err, ApiError):  # a bug: say so in the log and to the client, keep serving
                traceback.print_exc(file=sys.stderr)
                err = ApiError(500, f"internal error: {type(err).__name__}: {err}", kind="server_error")
            await err.response()(scope, receive, send)

    def _authorized(self, headers: Headers) -> bool:
        scheme, _, key = headers.get("authorization", "").partition(" ")
        # Compared as bytes: compare_digest refuses str with non-ASCII characters.
        return scheme.lower() == "bearer" and hmac.compare_digest(key.strip().encode(), self.api_key)

    def _too_large(self) -> ApiError:
        return ApiError(413, f"the request body exceeds {self.max_request_bytes} bytes (the server's "
                             "--max-request-bytes)", code="request_too_large")


TOKENIZER_ROUTES = ("/tokenize", "/detokenize", "/tokenizer_info")


def is_protected(path: str) -> bool:
    """The routes an API key guards: /v1/* and the tokenizer's."""
    return path == "/v1" or path.startswith("/v1/") or path in TOKENIZER_ROUTES


def is_loopback(host: str) -> bool:
    """Whether binding `host` serves this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# pydantic's error locations also name the union member tried ("str", "list[ContentPart]"): not parameters.
_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "function-after", "function-before", "union",
               "constrained-str", "NamedToolChoice"}


def validation_error(err: RequestValidationError) -> ApiError:
    """pydantic's refusal of a body (schemas.py) as one 400 naming the parameter at fault."""
    # Of a union's errors (one per member), the one that got furthest into the value says most: the deepest,
    # and not a mere "not this type" when another member's type matched.
    first = max(err.errors(), key=lambda e: (len(e["loc"]), not _is_type_mismatch(e["type"])))
    location = [str(part) for part in first["loc"][1:]
                if isinstance(part, int) or (part.isidentifier() and part not in _TYPE_NAMES)]
    param = ".".join(location) or None
    return ApiError(400, f"{param or 'body'}: {first['msg']}", param, "invalid_value")


def _is_type_mismatch(error_type: str) -> bool:
    return error_type.endswith("_type") or error_type in ("none_required", "literal_error", "is_instance_of")
