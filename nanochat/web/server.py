"""The HTTP server under the app: uvicorn, with a deadline for reading each request.

uvicorn closes a connection left idle `keep_alive_s` after a response, but a new connection starts no
timer: one that never sends a request, or sends it a byte at a time, stays open for good, and enough of
them exhaust the server's file descriptors. Here each connection must deliver each request, headers and
body, within `read_timeout_s` of being ready for it (opened, or its previous response sent), or it is
closed. A request that has fully arrived is never cut, however long its answer takes.
"""
from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("nanochat")


def timed_protocol(read_timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP/1.1 protocol class (httptools' or h11's) with the request read deadline."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class TimedHTTPProtocol(AutoHTTPProtocol):
        _read_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_read_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_read_timer()

        def connection_lost(self, exc) -> None:
            if self._read_timer is not None:
                self._read_timer.cancel()
            super().connection_lost(exc)

        def _arm_read_timer(self) -> None:
            if self._read_timer is not None:
                self._read_timer.cancel()
            self._read_timer = self.loop.call_later(read_timeout_s, self._read_timed_out)

        def _read_timed_out(self) -> None:
            self._read_timer = None
            cycle = self.cycle  # the request being served, or the last one
            waiting = cycle is None or cycle.response_complete or cycle.more_body
            if waiting and not self.transport.is_closing():
                log.info(f"closing a connection that sent no complete request within {read_timeout_s:g} s")
                self.transport.close()

    return TimedHTTPProtocol


def make_server(app, host: str = "127.0.0.1", port: int = 8000, read_timeout_s: float = 30.0,
                keep_alive_s: float = 5.0, log_level: str = "info"):
    """A uvicorn.Server for `app` (call .run(), or run it in a thread) with both timeouts."""
    import uvicorn

    if read_timeout_s <= 0 or keep_alive_s <= 0:
        raise ValueError(f"read_timeout_s ({read_timeout_s}) and keep_alive_s ({keep_alive_s}) must be > 0")
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, http=timed_protocol(read_timeout_s),
                            timeout_keep_alive=keep_alive_s)
    return uvicorn.Server(config)
