"""Serve the latest batch in Prometheus text format (pull), with no web framework."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from cladnet.metrics import Batch

log = logging.getLogger("cladnet.agent")

# Everything is typed gauge: a scrape reads a snapshot of the last batch, and the
# names stay the same as in the collector's stores.


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render(batches: list[Batch]) -> bytes:
    """Prometheus text exposition of the given batches (one per network)."""
    lines: list[str] = []
    typed: set[str] = set()
    for batch in batches:
        base = {"network": batch.network, "host": batch.host}
        for name, labels, value in batch.samples:
            metric = name
            if metric not in typed:
                typed.add(metric)
                lines.append(f"# TYPE {metric} gauge")
            all_labels = {**base, **labels}
            inner = ",".join(f'{k}="{_escape(v)}"' for k, v in all_labels.items())
            lines.append(f"{metric}{{{inner}}} {value!r} {int(batch.ts * 1000)}")
    return ("\n".join(lines) + "\n").encode()


class MetricsServer:
    """``GET /metrics`` on ``host:port``; anything else gets 404."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.latest: dict[str, Batch] = {}
        self._server: asyncio.Server | None = None

    async def run(self) -> None:
        """Bind (retrying: the address may be the overlay IP, not up yet) and serve."""
        while self._server is None:
            try:
                self._server = await asyncio.start_server(self._handle, self.host, self.port)
            except OSError as exc:
                log.debug("metrics address not bindable yet", extra={"error": repr(exc)})
                await asyncio.sleep(1.0)
        log.info("serving metrics", extra={"address": f"{self.host}:{self.port}"})
        await self._server.serve_forever()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            method, _, rest = request.partition(b" ")
            path = rest.split(b" ", 1)[0]
            if method == b"GET" and path.split(b"?")[0] == b"/metrics":
                body = render(list(self.latest.values()))
                status, ctype = b"200 OK", b"text/plain; version=0.0.4"
            else:
                body, status, ctype = b"not found\n", b"404 Not Found", b"text/plain"
            writer.write(
                b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
                b"Connection: close\r\n\r\n" % (status, ctype, len(body)) + body
            )
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
