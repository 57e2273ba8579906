"""A TCP proxy the tests put between the relay and a server, to cut or freeze."""

from __future__ import annotations

import asyncio


class TcpProxy:
    """A TCP proxy on loopback to a server (PostgreSQL, Redis) that the test cuts off
    (every connection dropped, new ones refused) or freezes (a partition: nothing passes,
    no connection is closed), then restores."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.cut_off = False
        self.frozen = False
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def cut(self) -> None:
        self.cut_off = True
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()

    def freeze(self) -> None:
        self.frozen = True

    def restore(self) -> None:
        """Pass again, for new connections: those that saw the silence are closed."""
        if self.frozen:
            for writer in self._writers:
                writer.transport.abort()
            self._writers.clear()
        self.cut_off = self.frozen = False

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut_off:
            writer.transport.abort()
            return
        if self.frozen:  # accepted, and never answered
            self._writers.add(writer)
            while await reader.read(65536):
                pass
            return
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, upstream_writer))
        await asyncio.gather(
            self._pipe(reader, upstream_writer),
            self._pipe(upstream_reader, writer),
            return_exceptions=True,
        )
        for end in (writer, upstream_writer):
            self._writers.discard(end)
            end.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            if self.frozen:
                continue  # swallowed: nobody hears anything, nobody is told
            writer.write(data)
            await writer.drain()
        writer.close()
