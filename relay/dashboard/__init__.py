"""The live dashboard: `GET /` and its static assets, served from the package.

The page needs no API key to load; it asks for one (or takes `?access_token=`) and
then reads `/v1/sessions` and follows `/v1/stream` like any other client. Assets are
read once at start-up and answered with an ETag, so browsers revalidate cheaply and
never run a stale script after an upgrade.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources

from aiohttp import web

from relay.errors import ApiError
from relay.routes import Reply, Route

_TYPES = {
    "index.html": "text/html",
    "app.js": "text/javascript",
    "common.js": "text/javascript",
    "views.js": "text/javascript",
    "charts.js": "text/javascript",
    "style.css": "text/css",
}
# The page runs only its own script and style and talks only to this origin.
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    # The key may be in the page's URL (`?access_token=`): never send it elsewhere.
    "Referrer-Policy": "no-referrer",
}


_NOT_MODIFIED = Reply("Unchanged since the `If-None-Match` ETag.", content_types=())


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    content_type: str
    etag: str


def load_assets() -> dict[str, Asset]:
    """Read the dashboard's files from the installed package."""
    folder = resources.files(__package__ or "relay.dashboard")
    assets = {}
    for name, content_type in _TYPES.items():
        body = folder.joinpath(name).read_bytes()
        etag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'
        assets[name] = Asset(body, content_type, etag)
    return assets


def routes() -> list[Route]:
    """`GET /` (the page) and `GET /dashboard/{name}` (its script and style)."""
    assets = load_assets()

    def serve(request: web.Request, name: str) -> web.Response:
        asset = assets.get(name)
        if asset is None:
            raise ApiError(404, "NOT_FOUND", f"no dashboard file {name!r}")
        headers = {**_HEADERS, "ETag": asset.etag}
        if name == "index.html":
            headers["Content-Security-Policy"] = _CSP
            headers["X-Frame-Options"] = "DENY"
        if asset.etag in request.headers.get("If-None-Match", ""):
            return web.Response(status=304, headers=headers)
        return web.Response(
            body=asset.body, content_type=asset.content_type, charset="utf-8", headers=headers
        )

    async def page(request: web.Request) -> web.Response:
        return serve(request, "index.html")

    async def asset(request: web.Request) -> web.Response:
        return serve(request, request.match_info["name"])

    return [
        Route(
            "GET",
            "/",
            page,
            "The live dashboard page",
            tag="dashboard",
            replies={
                200: Reply("The page; it asks for an API key.", content_types=("text/html",)),
                304: _NOT_MODIFIED,
            },
            description="Takes the API key as `?access_token=` or asks for it.",
        ),
        Route(
            "GET",
            "/dashboard/{name}",
            asset,
            "The dashboard's script and style",
            tag="dashboard",
            replies={
                200: Reply("The file.", content_types=("text/javascript", "text/css")),
                304: _NOT_MODIFIED,
            },
            errors={404: ("NOT_FOUND",)},
        ),
    ]
