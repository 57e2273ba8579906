"""`GET /openapi.json`: an OpenAPI 3.1 document built from the route declarations."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import orjson
from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from relay import __version__
from relay.api_models import ErrorEnvelope
from relay.routes import JSON, ROUTES, Handler, Reply, Route

REF = "#/components/schemas/{model}"
_ROUTER_PATTERN = re.compile(r"\{(\w+):[^}]*\}")
_PATH_PARAM = re.compile(r"\{([^}:]+)\}")
_SECURITY_SCHEMES = {
    "bearer": {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key: `Authorization: Bearer <key>`.",
    },
    "accessToken": {
        "type": "apiKey",
        "in": "query",
        "name": "access_token",
        "description": "The same key as a query parameter, on event streams only, for "
        "clients that cannot set headers (browser `EventSource`).",
    },
}
_ERRORS = {
    400: "The request is invalid.",
    401: "Not authenticated.",
    403: "The API key lacks the required scope.",
    404: "Not found.",
    413: "The body is too large.",
    429: "Too many requests.",
    503: "Unavailable for now; retry after `Retry-After` seconds.",
}


def openapi_document(routes: Iterable[Route]) -> dict[str, Any]:
    """The OpenAPI 3.1 document describing `routes`."""
    routes = list(routes)
    schemas: dict[str, Any] = {}
    refs = _model_schemas(routes, schemas)
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        path = _ROUTER_PATTERN.sub(r"{\1}", route.path)  # `{path:.*}` -> `{path}`
        paths.setdefault(path, {})[route.method.lower()] = _operation(route, refs, schemas)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "relay",
            "version": __version__,
            "description": "Webhook and event-ingestion relay for AI-agent platforms. "
            'Every error answers `{"error": {"code", "message"}}`.',
        },
        "paths": paths,
        "components": {"schemas": schemas, "securitySchemes": _SECURITY_SCHEMES},
    }


def _model_schemas(routes: list[Route], schemas: dict[str, Any]) -> dict[Any, Any]:
    """JSON Schemas of every request and response model, shared under components."""
    models: list[tuple[type[BaseModel], JsonSchemaMode]] = [(ErrorEnvelope, "serialization")]
    for route in routes:
        if route.body is not None:
            models.append((route.body, "validation"))
        models.extend(
            (reply.model, "serialization") for reply in route.replies.values() if reply.model
        )
    refs, top = models_json_schema(list(dict.fromkeys(models)), ref_template=REF)
    schemas.update(top.get("$defs", {}))
    return refs


def _operation(route: Route, refs: dict[Any, Any], schemas: dict[str, Any]) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "operationId": _operation_id(route),
        "summary": route.summary,
        "tags": [route.tag],
    }
    if route.description:
        operation["description"] = route.description
    parameters = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in _PATH_PARAM.findall(_ROUTER_PATTERN.sub(r"{\1}", route.path))
    ]
    parameters += _parameters(route.query, "query", schemas)
    parameters += _parameters(route.headers, "header", schemas)
    if parameters:
        operation["parameters"] = parameters
    if route.body is not None:
        schema = refs[(route.body, "validation")]
        operation["requestBody"] = {"required": True, "content": {JSON: {"schema": schema}}}
    if route.scope is not None:
        operation["security"] = [{"bearer": [route.scope]}]
        if route.query_token:
            operation["security"].append({"accessToken": [route.scope]})
    else:
        operation["security"] = []
    responses = {
        str(status): _reply(reply, refs) for status, reply in sorted(route.replies.items())
    }
    for status, codes in route.error_codes().items():
        responses[str(status)] = _error_reply(status, codes, refs)
    operation["responses"] = responses
    return operation


def _operation_id(route: Route) -> str:
    words = re.findall(r"[a-z0-9]+", route.path.replace("{", "by_").lower())
    return "_".join([route.method.lower(), *words]) if words else route.method.lower() + "_root"


def _parameters(
    model: type[BaseModel] | None, where: str, schemas: dict[str, Any]
) -> list[dict[str, Any]]:
    if model is None:
        return []
    schema = model.model_json_schema(ref_template=REF)
    schemas.update(schema.pop("$defs", {}))
    required = set(schema.get("required", ()))
    parameters = []
    for name, prop in schema["properties"].items():
        prop = _without_null(prop)
        if prop.get("default", 0) is None:
            del prop["default"]
        description = prop.pop("description", None)
        prop.pop("title", None)
        parameter: dict[str, Any] = {"name": name, "in": where, "required": name in required}
        if description:
            parameter["description"] = description
        parameter["schema"] = prop
        parameters.append(parameter)
    return parameters


def _without_null(schema: dict[str, Any]) -> dict[str, Any]:
    """A parameter is absent rather than null: drop the null branch of an optional one."""
    options = schema.get("anyOf")
    if options is None:
        return dict(schema)
    rest = [option for option in options if option.get("type") != "null"]
    base = {key: value for key, value in schema.items() if key != "anyOf"}
    if len(rest) == 1:
        return {**rest[0], **base}
    return {**base, "anyOf": rest}


def _reply(reply: Reply, refs: dict[Any, Any]) -> dict[str, Any]:
    answer: dict[str, Any] = {"description": reply.description}
    if reply.headers:
        answer["headers"] = {
            name: {"description": text, "schema": {"type": "string"}}
            for name, text in reply.headers.items()
        }
    if reply.content_types:
        answer["content"] = {
            media: {"schema": _body_schema(reply, media, refs)} for media in reply.content_types
        }
    return answer


def _body_schema(reply: Reply, media: str, refs: dict[Any, Any]) -> dict[str, Any]:
    if reply.model is not None:
        schema: dict[str, Any] = refs[(reply.model, "serialization")]
        return schema
    return {"type": "object"} if media == JSON else {"type": "string"}


def _error_reply(status: int, codes: tuple[str, ...], refs: dict[Any, Any]) -> dict[str, Any]:
    envelope = refs[(ErrorEnvelope, "serialization")]
    # The envelope, with `code` narrowed to the codes this route answers with this status.
    narrowed = {"properties": {"error": {"properties": {"code": {"enum": list(codes)}}}}}
    answer: dict[str, Any] = {
        "description": f"{_ERRORS.get(status, 'Error.')} Codes: {', '.join(codes)}.",
        "content": {JSON: {"schema": {"allOf": [envelope, narrowed]}}},
    }
    if status == 503:
        answer["headers"] = {"Retry-After": {"schema": {"type": "string"}}}
    return answer


def openapi_handler() -> Handler:
    """`GET /openapi.json`: the app's document, built on the first request and kept."""
    built: list[bytes] = []

    async def serve(request: web.Request) -> web.Response:
        if not built:
            routes: list[Route] = request.app[ROUTES]
            built.append(orjson.dumps(openapi_document(routes)))
        return web.Response(body=built[0], content_type=JSON)

    return serve
