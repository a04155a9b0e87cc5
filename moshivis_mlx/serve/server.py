"""The server: Kyutai's websocket protocol at `/api/chat`, our page at `/`.

    event loop (aiohttp)   the sockets: checks the token and the origin, decodes and bounds
                           every message, decodes the client's Opus into 80 ms frames,
                           sends what the model thread made (a bounded queue per client)
    model thread (host.py) every step of the model, the image encoder, Opus encoding

A connection goes: upgrade -> options from the query -> (busy? an error, closed) -> attach
a conversation -> the handshake, in Moshi's order (at once) or MoshiVis' (after the
client's image) -> messages both ways until the client leaves, goes idle, stops reading or
sends something malformed (then a 0x05 error message, and the connection is closed) ->
detach: nothing of it is kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from aiohttp import WSCloseCode, WSMsgType, web

from ..errors import one_line
from . import protocol
from .host import Conversation, ModelHost
from .protocol import ProtocolError
from .security import Security

STATIC = Path(__file__).parent / "static"
TOKEN_COOKIE = "moshivis_token"
OUTBOX = 64
"""Messages waiting to be sent to one client (a step makes two or three): beyond this the
client is not reading and the connection ends."""
SEND_TIMEOUT = 5.0
CLOSE_TIMEOUT = 2.0
FRAME = 1920

log = logging.getLogger("moshivis_mlx.serve")


@dataclass(frozen=True)
class Limits:
    idle_timeout: float = 30.0
    """Seconds without a message from the client after which the connection ends."""
    handshake_wait: float = 1.0
    """How long to wait for a MoshiVis client's image before the handshake (image=auto)."""


class Closing(Exception):
    """Ends a connection: the reason goes to the client as a 0x05 error message."""

    def __init__(self, reason: str, code: int = WSCloseCode.POLICY_VIOLATION):
        super().__init__(reason)
        self.code = code


class Server:
    """The aiohttp application around a loaded `ModelHost`."""

    def __init__(self, host: ModelHost, security: Security, static: Path = STATIC,
                 limits: Limits = Limits()):
        self.host = host
        self.security = security
        self.static = Path(static)
        self.limits = limits
        self.active: Connection | None = None
        self.served = 0
        """Conversations served so far (busy refusals not counted)."""
        self.refused = 0

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._token_middleware],
                              client_max_size=64 << 10)
        app.router.add_get("/api/chat", self.chat)
        app.router.add_get("/", self.index)
        app.router.add_static("/", self.static, follow_symlinks=False, name="static")
        return app

    # -- HTTP ------------------------------------------------------------------------------

    @web.middleware
    async def _token_middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Every route needs the token when the server has one: from the query (the printed
        URL), the cookie set when the page was opened with it, or a bearer header."""
        offered = request.query.get("token") or request.cookies.get(TOKEN_COOKIE)
        auth = request.headers.get("Authorization", "")
        if offered is None and auth.startswith("Bearer "):
            offered = auth[len("Bearer "):]
        if not self.security.allows(offered):
            return web.Response(status=401, text="this server needs its access token: open the "
                                "URL it printed when it started (…/?token=…)\n")
        response = await handler(request)
        if self.security.token is not None and request.query.get("token") and \
                isinstance(response, web.Response | web.FileResponse):
            response.set_cookie(TOKEN_COOKIE, self.security.token, httponly=True,
                                samesite="Strict", secure=self.security.ssl_context is not None)
        return response

    async def index(self, request: web.Request) -> web.StreamResponse:
        page = self.static / "index.html"
        if not page.is_file():
            raise web.HTTPNotFound(text=f"no index.html in {self.static}\n")
        return web.FileResponse(page, headers={"Cache-Control": "no-store"})

    def _same_origin(self, request: web.Request) -> bool:
        """A browser names the page that opens a websocket: only our own page (or a
        client that is no browser, which sends no Origin) may talk to the model."""
        origin = request.headers.get("Origin")
        if origin is None:
            return True
        try:
            return urlsplit(origin).netloc.lower() == request.host.lower()
        except ValueError:
            return False

    # -- the websocket ---------------------------------------------------------------------

    async def chat(self, request: web.Request) -> web.StreamResponse:
        if not self._same_origin(request):
            return web.Response(status=403, text="cross-origin websocket refused\n")
        ws = web.WebSocketResponse(max_msg_size=protocol.MAX_MESSAGE_BYTES,
                                   timeout=CLOSE_TIMEOUT, autoping=True)
        await ws.prepare(request)
        _bound_send_buffer(request)
        conn = Connection(self, request, ws)
        try:
            options = protocol.client_options(dict(request.query))
        except ProtocolError as e:
            await conn.end(str(e))
            return ws
        if self.active is not None:
            self.refused += 1
            await conn.end("busy: another conversation is in progress on this server; try "
                           "again when it ends", WSCloseCode.TRY_AGAIN_LATER)
            return ws
        self.active = conn
        self.served += 1
        try:
            await conn.run(options)
        finally:
            self.active = None
        return ws


class Connection:
    """One client's websocket, from the handshake to the close."""

    def __init__(self, server: Server, request: web.Request, ws: web.WebSocketResponse):
        self.server = server
        self.host = server.host
        self.request = request
        self.ws = ws
        self.loop = asyncio.get_running_loop()
        self.outbox: asyncio.Queue[bytes] = asyncio.Queue()
        self.conv: Conversation | None = None
        self.failure: str | None = None
        """Why the model thread's side ends the connection (set on the loop)."""
        self.wakeup = asyncio.Event()
        self.pending = np.zeros(0, dtype=np.float32)
        self.reader: Any = None

    # -- the model thread's messages ----------------------------------------------------------

    def _deliver(self, messages: list[bytes]) -> None:
        """On the loop: queue what a step made; a client that does not read is ended."""
        if self.failure is not None:
            return
        for m in messages:
            if m[0] == protocol.ERROR:  # the model thread ended the conversation
                self.failure = m[1:].decode("utf-8", "replace")
                self.wakeup.set()
                return
            if self.outbox.qsize() >= OUTBOX:
                self.failure = "the client does not read what the server sends"
                self.wakeup.set()
                return
            self.outbox.put_nowait(m)

    def send_from_thread(self, messages: list[bytes]) -> None:
        if messages:
            self.loop.call_soon_threadsafe(self._deliver, messages)

    async def _sender(self) -> None:
        while True:
            message = await self.outbox.get()
            try:
                await asyncio.wait_for(self.ws.send_bytes(message), SEND_TIMEOUT)
            except (asyncio.TimeoutError, ConnectionError, RuntimeError):
                self.failure = self.failure or "the client does not read what the server sends"
                self.wakeup.set()
                return

    # -- lifecycle -----------------------------------------------------------------------------

    async def run(self, options: protocol.ClientOptions) -> None:
        conv = Conversation(options, self.send_from_thread)
        self.conv = conv
        attached = asyncio.Event()
        self.host.attach(conv, lambda: self.loop.call_soon_threadsafe(attached.set))
        sender = None
        try:
            await asyncio.wait_for(attached.wait(), 60)
            first = await self._handshake(options)
            await self._send_now(protocol.metadata(self._info(options)))
            # The model's messages only after the handshake (the first image's news waits).
            sender = asyncio.create_task(self._sender())
            if first is not None:
                await self._handle(first)
            await self._receive_loop()
        except Closing as e:
            await self.end(str(e), e.code)
        except ProtocolError as e:
            await self.end(str(e))
        except (asyncio.TimeoutError, ConnectionError):
            await self.end("the conversation could not start in time")
        except _Gone:
            pass
        finally:
            self.host.detach(conv)
            if sender is not None:
                sender.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await sender
            self.reader = None
            self.pending = np.zeros(0, dtype=np.float32)
            if not self.ws.closed:
                await self._close(WSCloseCode.OK, "")

    def _info(self, options: protocol.ClientOptions) -> dict[str, Any]:
        loaded = self.host.loaded
        return {"type": "info", "server": "moshivis-mlx", "model": loaded.name,
                "vision": self.host.vision, "image": loaded.default_image,
                "sample_rate": protocol.SAMPLE_RATE, "frame_size": FRAME,
                "audio": "pcm" if options.pcm else "opus",
                "text": "colored" if self.conv.colored else "plain",
                "idle_timeout": self.server.limits.idle_timeout,
                "ignored": list(options.ignored)}

    async def _handshake(self, options: protocol.ClientOptions) -> Any:
        """Moshi's order (the handshake at once) or MoshiVis' (after the client's image).
        Returns a first message that was not an image, to be handled after the handshake."""
        wait = {"none": None, "first": self.server.limits.idle_timeout,
                "auto": self.server.limits.handshake_wait if self.host.vision else None
                }[options.image]
        first = None
        if wait is not None:
            try:
                raw = await self.ws.receive(timeout=wait)
            except asyncio.TimeoutError:
                if options.image == "first":
                    raise Closing("image=first: no image came before the idle timeout"
                                  ) from None
                raw = None
            if raw is not None:
                message = self._decode(raw)
                if message.kind == protocol.IMAGE:
                    if options.colored is None:
                        self.conv.colored = True  # as MoshiVis' servers send text
                    applied = asyncio.Event()
                    self._command("image", (message.payload, "image"),
                                  lambda: self.loop.call_soon_threadsafe(applied.set))
                    await asyncio.wait_for(applied.wait(), 60)
                elif options.image == "first":
                    raise ProtocolError(f"image=first: the first message must be an image, "
                                        f"not {protocol.NAMES[message.kind]}")
                else:
                    first = message
        await self._send_now(protocol.handshake())
        return first

    def _decode(self, raw: Any) -> protocol.Message:
        if raw.type == WSMsgType.BINARY:
            return protocol.decode(raw.data)
        if raw.type == WSMsgType.TEXT:
            raise ProtocolError("text frames are not part of the protocol (binary messages only)")
        if raw.type == WSMsgType.ERROR:
            raise Closing(f"websocket error: {one_line(self.ws.exception(), 200)}",
                          WSCloseCode.MESSAGE_TOO_BIG)
        raise _Gone()

    async def _receive_loop(self) -> None:
        idle = self.server.limits.idle_timeout
        while True:
            receive = asyncio.ensure_future(self.ws.receive())
            woken = asyncio.ensure_future(self.wakeup.wait())
            done, _ = await asyncio.wait({receive, woken}, timeout=idle,
                                         return_when=asyncio.FIRST_COMPLETED)
            if receive not in done:
                receive.cancel()
                woken.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await receive
                if self.failure is not None:
                    raise Closing(self.failure)
                raise Closing(f"idle: no message from the client for {idle:g} s")
            woken.cancel()
            try:
                await self._handle(self._decode(receive.result()))
            except _Gone:
                return
            if self.failure is not None:
                raise Closing(self.failure)

    async def _handle(self, message: protocol.Message) -> None:
        kind = message.kind
        if kind == protocol.AUDIO:
            if self.reader is None:
                import sphn

                self.reader = sphn.OpusStreamReader(protocol.SAMPLE_RATE)
            try:
                pcm = self.reader.append_bytes(protocol.repair_ogg_page(message.payload))
            except Exception as e:  # sphn raises ValueError for pages that are not Ogg Opus
                raise ProtocolError(f"audio that is not Ogg Opus ({one_line(e, 120)})"
                                    ) from None
            self._frames(pcm)
        elif kind == protocol.PCM:
            self._frames(message.value)
        elif kind == protocol.IMAGE:
            self._command("image", (message.payload, "image"))
        elif kind == protocol.CONTROL:
            if message.value == protocol.CONTROL_RESTART:
                self._command("restart")
            elif message.value == protocol.CONTROL_PAUSE:
                self._command("mute", True)
            elif message.value == protocol.CONTROL_START:
                self._command("mute", False)
        elif kind == protocol.PING:
            self._deliver([protocol.ping(message.payload)])
        # handshake, text, metadata, error, coloured text, rating: accepted, nothing to do

    def _frames(self, pcm: np.ndarray) -> None:
        """The client's audio, cut into the model's frames (the rest waits for more)."""
        pcm = np.asarray(pcm, dtype=np.float32).reshape(-1)
        if not np.all(np.isfinite(pcm)):
            raise ProtocolError("audio with samples that are not finite numbers")
        pending = np.concatenate([self.pending, pcm]) if len(self.pending) else pcm
        n = len(pending) // FRAME
        for i in range(n):
            self.conv.push_frame(pending[i * FRAME:(i + 1) * FRAME].copy())
        self.pending = pending[n * FRAME:].copy()
        if n:
            self.host.wake.set()

    def _command(self, name: str, arg: Any = None, done: Any = None) -> None:
        if not self.conv.push_command(name, arg, done):
            raise ProtocolError("too many commands waiting (images, restarts, mutes)")
        self.host.wake.set()

    async def _send_now(self, message: bytes) -> None:
        try:
            await asyncio.wait_for(self.ws.send_bytes(message), SEND_TIMEOUT)
        except (asyncio.TimeoutError, ConnectionError, RuntimeError):
            raise _Gone() from None

    async def end(self, reason: str, code: int = WSCloseCode.POLICY_VIOLATION) -> None:
        """The error message, then the close (within a bound: the client may not read)."""
        log.info("closing a connection: %s", reason)
        if not self.ws.closed:
            with contextlib.suppress(asyncio.TimeoutError, ConnectionError, RuntimeError):
                await asyncio.wait_for(self.ws.send_bytes(protocol.error(reason)), CLOSE_TIMEOUT)
            await self._close(code, reason)

    async def _close(self, code: int, reason: str) -> None:
        try:
            await asyncio.wait_for(self.ws.close(code=code, message=reason.encode()[:120]),
                                   CLOSE_TIMEOUT)
        except (asyncio.TimeoutError, ConnectionError, RuntimeError):
            transport = self.request.transport
            if transport is not None:
                transport.abort()


SEND_BUFFER = 256 << 10
"""The kernel's send buffer of a websocket (PCM audio is 48 KB/s): what a client that stops
reading can leave queued in the kernel is bounded too, and found out within seconds."""


def _bound_send_buffer(request: web.Request) -> None:
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)


class _Gone(Exception):
    """The client closed the connection."""


async def serve(server: Server, host: str, port: int, started: Any = None) -> None:
    """Runs the server until cancelled; `started(url_port)` once it listens."""
    runner = web.AppRunner(server.app(), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=server.security.ssl_context,
                       reuse_address=True)
    await site.start()
    bound = port
    sockets = getattr(site._server, "sockets", None) or []
    if sockets:
        bound = sockets[0].getsockname()[1]
    if started is not None:
        started(bound)
    try:
        while True:
            await asyncio.sleep(3600)
    finally:
        await runner.cleanup()
