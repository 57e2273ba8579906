"""Typed keys under which the app keeps its dependencies."""

from __future__ import annotations

from aiohttp import web

from relay.config import Settings
from relay.hub import Hub
from relay.metrics import Metrics
from relay.store import Store
from relay.stream_keys import StreamKeys
from relay.webhooks.dispatcher import Dispatcher
from relay.webhooks.secrets import SecretBox
from relay.webhooks.store import DeliveryStore

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", Store)
METRICS = web.AppKey("metrics", Metrics)
HUB = web.AppKey("hub", Hub)
STREAM_KEYS = web.AppKey("stream_keys", StreamKeys)
DELIVERY_STORE = web.AppKey("delivery_store", DeliveryStore)
DISPATCHER = web.AppKey("dispatcher", Dispatcher)
SECRET_BOX = web.AppKey("secret_box", SecretBox)
