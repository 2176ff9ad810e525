"""The callback endpoint's TLS, lean per connection.

asyncio's TLS layer (``asyncio.sslproto.SSLProtocol``, Python 3.11 and
later) gives every connection its own 256 KiB receive buffer, allocated and
zeroed when the connection is accepted, and hands OpenSSL up to 256 KiB of
ciphertext at a time, which OpenSSL's memory BIO keeps room for (about
340 KiB) for as long as the connection lives.  300 agents connected at once
cost about 180 MiB that way, most of it while they wait.

:class:`LeanSSLProtocol` is the same protocol with two changes:

* one receive buffer shared by every connection of the server (the loop
  copies from it into the connection's BIO before it reads another socket,
  so one is enough for any number of connections), read ``RECV_SIZE`` at a
  time;
* the ciphertext goes to the BIO ``BIO_SLICE`` at a time, each slice
  decrypted and handed on before the next one, so that the room OpenSSL
  keeps per connection is about a quarter of what it was; while a
  connection's BIO still holds ciphertext (its reader is slow), its socket
  is read only a slice at a time, and paused at ``BIO_HIGH_WATER``.

Same protocol otherwise: the handshake, flow control, shutdown and errors
are asyncio's own.  It relies on ``SSLProtocol``'s buffered-protocol
interface (``get_buffer``/``buffer_updated`` and its ``_ssl_buffer_view``);
where that is not there (Python 3.9 and 3.10), the endpoint uses asyncio's
TLS as it is (:func:`lean_supported`).
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Optional

from aiohttp import web

try:
    from asyncio.sslproto import SSLProtocol as _SSLProtocol
except ImportError:  # pragma: no cover
    _SSLProtocol = None  # type: ignore[assignment,misc]

#: Ciphertext read from a socket at a time, into the shared buffer.
RECV_SIZE = 256 << 10
#: Ciphertext written to a connection's BIO at a time.
BIO_SLICE = 64 << 10
#: A connection's socket is paused when this much ciphertext waits in its
#: BIO (its reader is slower than its sender), resumed under a quarter of it.
BIO_HIGH_WATER = 2 * BIO_SLICE


def lean_supported() -> bool:
    """Whether this Python's asyncio TLS is the buffered protocol this
    module builds on (3.11 and later)."""
    return (_SSLProtocol is not None and issubclass(_SSLProtocol, asyncio.BufferedProtocol)
            and hasattr(_SSLProtocol, "_set_read_buffer_limits")
            and "_ssl_buffer_view" in _SSLProtocol.__init__.__code__.co_names)


if _SSLProtocol is not None:

    class LeanSSLProtocol(_SSLProtocol):  # type: ignore[misc,valid-type]
        """asyncio's server-side TLS protocol with a shared receive buffer
        and smaller reads (see the module's docstring)."""

        #: (the room one SSL read is given: a TLS record holds 16 KiB at most)
        max_size = 32 << 10

        def __init__(self, loop, app_protocol, sslcontext, shared: memoryview, **kw) -> None:
            super().__init__(loop, app_protocol, sslcontext, None, server_side=True, **kw)
            # (the base class allocated max_size of its own: dropped here)
            self._ssl_buffer = shared.obj
            self._ssl_buffer_view = self._shared = shared
            self._set_read_buffer_limits(high=BIO_HIGH_WATER)

        def get_buffer(self, n):
            # The loop fills it and calls buffer_updated() at once, which
            # copies it into this connection's BIO: shared safely.
            if self._incoming.pending:  # (not all read: a slice at a time)
                return self._shared[:BIO_SLICE]
            return self._shared

        def buffer_updated(self, nbytes):
            shared = self._shared
            if nbytes <= BIO_SLICE:
                return super().buffer_updated(nbytes)
            try:
                for start in range(0, nbytes, BIO_SLICE):
                    # (the base class writes _ssl_buffer_view[:n] to the BIO)
                    self._ssl_buffer_view = shared[start:]
                    super().buffer_updated(min(BIO_SLICE, nbytes - start))
            finally:
                self._ssl_buffer_view = shared


class LeanTLSSite(web.BaseSite):
    """An aiohttp site: TCP on ``host``:``port`` with TLS by
    :class:`LeanSSLProtocol`."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, ssl_context: ssl.SSLContext,
                 backlog: int = 128) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self._lean_host = host
        self._lean_port = port

    @property
    def name(self) -> str:
        sockets = self._server.sockets if self._server is not None else None
        port = sockets[0].getsockname()[1] if sockets else self._lean_port
        return "https://%s:%d" % (self._lean_host, port)

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None
        shared = memoryview(bytearray(RECV_SIZE))
        context = self._ssl_context

        def protocol() -> asyncio.BaseProtocol:
            return LeanSSLProtocol(loop, server(), context, shared)

        self._server = await loop.create_server(protocol, self._lean_host, self._lean_port,
                                                backlog=self._backlog, reuse_address=True)


def site(runner: web.BaseRunner, host: str, port: int, ssl_context: ssl.SSLContext,
         lean: Optional[bool] = None) -> web.BaseSite:
    """The endpoint's site: lean TLS where this Python allows it."""
    if lean is None:
        lean = lean_supported()
    if lean:
        return LeanTLSSite(runner, host, port, ssl_context)
    return web.TCPSite(runner, host, port, ssl_context=ssl_context, reuse_address=True)
