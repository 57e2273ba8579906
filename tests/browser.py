"""Debian's headless Chromium for tests: how to start it, and a DevTools connection to a page."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import shutil
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="needs Debian's chromium package: apt-get install chromium (.ci/run installs it)",
)
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


async def launch(profile: Path, url: str, *extra: str) -> asyncio.subprocess.Process:
    """Start headless Chromium on `url` with its own profile directory."""
    assert CHROMIUM is not None
    return await asyncio.create_subprocess_exec(
        CHROMIUM,
        *FLAGS,
        f"--user-data-dir={profile}",
        *extra,
        url,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )


class Page:
    """One browser tab, driven over the DevTools protocol (a loopback WebSocket)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._ids = itertools.count(1)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self._ids)
        await self._ws.send_json({"id": call_id, "method": method, "params": params})
        async with asyncio.timeout(30):  # a loaded machine's Chromium can be slow
            while True:
                message = json.loads(await self._ws.receive_str())
                if message.get("id") != call_id:
                    continue  # a protocol event, not our answer
                if "error" in message:
                    raise AssertionError(f"{method} failed: {message['error']}")
                result: dict[str, Any] = message["result"]
                return result

    async def evaluate(self, expression: str) -> Any:
        """The JSON value of a JavaScript expression in the page."""
        result = await self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, seconds: float = 30.0) -> Any:
        """Poll `expression` until it is truthy (errors count as not yet); fail after
        `seconds` with its last value."""
        deadline = time.monotonic() + seconds
        value: Any = None
        while time.monotonic() < deadline:
            try:
                value = await self.evaluate(expression)
            except AssertionError as exc:  # e.g. the page is still loading
                value = exc
            if value and not isinstance(value, AssertionError):
                return value
            await asyncio.sleep(0.05)
        raise AssertionError(f"the page never showed {expression!r}; last value: {value!r}")

    async def screenshot(self, path: Path) -> bytes:
        """Save a PNG of the viewport to `path` and return its bytes."""
        result = await self.call("Page.captureScreenshot", format="png")
        png = base64.b64decode(result["data"])
        await asyncio.to_thread(path.write_bytes, png)
        return png


async def _devtools_port(profile: Path, browser: asyncio.subprocess.Process) -> int:
    # With --remote-debugging-port=0 Chromium picks a free port and writes it here.
    port_file = profile / "DevToolsActivePort"
    for _ in range(1200):  # Chromium starts slowly on a loaded machine
        if browser.returncode is not None:
            raise AssertionError(f"chromium exited with {browser.returncode}")
        if port_file.exists():
            first_line = port_file.read_text().split("\n", 1)[0].strip()
            if first_line.isdigit():
                return int(first_line)
        await asyncio.sleep(0.05)
    raise AssertionError("chromium did not open its DevTools port within 60 s")


@asynccontextmanager
async def open_page(
    profile: Path, url: str, width: int = 1360, height: int = 760
) -> AsyncIterator[Page]:
    """Headless Chromium showing `url`, with a DevTools connection to that tab."""
    browser = await launch(
        profile, url, "--remote-debugging-port=0", f"--window-size={width},{height}"
    )
    try:
        port = await _devtools_port(profile, browser)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/json/list") as resp:
                targets = await resp.json()
            tab = next(t for t in targets if t["type"] == "page")
            async with http.ws_connect(tab["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                yield Page(ws)
    finally:
        browser.kill()
        await browser.wait()
