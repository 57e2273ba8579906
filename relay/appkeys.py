"""Typed keys under which the app keeps its dependencies."""

from __future__ import annotations

from aiohttp import web

from relay.config import Settings
from relay.hub import Hub
from relay.metrics import Metrics
from relay.store import Store

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", Store)
METRICS = web.AppKey("metrics", Metrics)
HUB = web.AppKey("hub", Hub)
