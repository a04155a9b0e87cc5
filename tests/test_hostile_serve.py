"""The server under hostile clients: random message kinds, truncated and corrupt Ogg
pages, a 100 MB message, an image bomb, a thousand connections opened and dropped, a
client that stops reading. Each may end its own connection (with a 0x05 error message where
the socket still carries one), never the server: afterwards it still serves a conversation,
and its memory is flat."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import random
import socket
import struct
import time

import aiohttp
import numpy as np
import pytest
from app_support import run_app
from serve_support import ServerProcess, converse, run

from moshivis_mlx.serve import protocol

RSS_GROWTH_MB = 40
"""Allowed growth of the server's memory over the whole module (a leak of a connection's
state, 1,000 times, or of a 100 MB message, is far more)."""


def test_network_bind_without_tls_refused_in_one_line(tmp_path):
    """Before anything loads (no model, no certificate): one line, exit 2."""
    r = run_app("--serve", "--host", "0.0.0.0", "--no-tls", "--demo")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs TLS" in lines[0], r.stderr
    assert not r.stdout.strip()


@pytest.fixture(scope="module")
def server():
    s = ServerProcess("--idle-timeout", "5").start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def baseline(server):
    """The server's memory once it has served a conversation of each kind."""
    for _ in range(2):
        serves(server)
    return server.rss_mb()


def serves(server: ServerProcess) -> None:
    """A short conversation still works."""
    t = np.arange(24000) / 24000
    out = run(converse(server.ws_url(image="none", audio="pcm"),
                       (0.2 * np.sin(2 * np.pi * 200 * t)).astype(np.float32), pcm=True,
                       seconds_after=0.5))
    assert not out["errors"], out["errors"]
    assert len(out["audio"]) >= 24000 and out["text"]
    assert server.alive()


async def _session(server: ServerProcess, messages: list[bytes], **query: str) -> list:
    """Connects (Moshi's order), sends `messages`, returns what came back until the close
    (or 3 s of quiet)."""
    got = []
    async with aiohttp.ClientSession() as s, s.ws_connect(
            server.ws_url(image="none", **query), max_msg_size=0) as ws:
        assert (await ws.receive(timeout=10)).data == b"\x00"
        try:
            for m in messages:
                await ws.send_bytes(m)
        except (ConnectionError, RuntimeError):
            pass
        while True:
            try:
                m = await ws.receive(timeout=3)
            except asyncio.TimeoutError:
                break
            if m.type != aiohttp.WSMsgType.BINARY:
                got.append(("close", ws.close_code))
                break
            got.append((m.data[0], m.data[1:]))
    return got


def _error_then_close(got: list) -> str:
    errors = [p.decode() for k, p in got if k == protocol.ERROR]
    assert errors, f"no error message: {got[-3:]}"
    assert got[-1][0] == "close", got[-3:]
    assert [k for k, _ in got].index(protocol.ERROR) == len(got) - 2  # the last message
    return errors[0]


@pytest.mark.slow
def test_random_kinds(server, baseline):
    rng = random.Random(0)
    valid = set(protocol.LIMITS)
    for kind in rng.sample(sorted(set(range(256)) - valid), 40):
        payload = rng.randbytes(rng.randrange(0, 3000))
        reason = _error_then_close(run(_session(server, [bytes([kind]) + payload])))
        assert reason.startswith(f"unknown message kind 0x{kind:02x}")
    # Known kinds with random payloads: accepted or refused, never the server's end.
    for _ in range(30):
        kind = rng.choice(sorted(valid - {protocol.AUDIO, protocol.IMAGE}))
        run(_session(server, [bytes([kind]) + rng.randbytes(rng.randrange(0, 300))]))
    run(_session(server, [b""]))
    serves(server)


@pytest.mark.slow
def test_truncated_and_corrupt_ogg(server, baseline):
    import sphn

    writer = sphn.OpusStreamWriter(24000)
    pages = [writer.append_pcm(np.zeros(1920, np.float32)) for _ in range(5)]
    first, later = pages[0], b"".join(pages[1:])
    cases = [
        [b"\x01" + first[: len(first) // 2], b"\x01" + later],  # a page cut in half
        [b"\x01" + first, b"\x01" + later[:7], b"\x01" + os.urandom(500)],
        [b"\x01" + os.urandom(4000)],
        [b"\x01OggS" + os.urandom(60)],
        [b"\x01" + first[:30]],  # only a header's start: waits for more, then the idle end
    ]
    for messages in cases:
        got = run(_session(server, messages))
        if any(k == protocol.ERROR for k, _ in got):
            assert "Ogg Opus" in _error_then_close(got)
    serves(server)


@pytest.mark.slow
def test_hundred_megabyte_message(server, baseline):
    async def go() -> tuple:
        async with aiohttp.ClientSession() as s, s.ws_connect(
                server.ws_url(image="none")) as ws:
            await ws.receive(timeout=10)
            try:
                await ws.send_bytes(b"\x08" + bytes(100 << 20))
            except (ConnectionError, RuntimeError):
                pass
            got = []
            while (m := await ws.receive(timeout=30)).type == aiohttp.WSMsgType.BINARY:
                got.append(m.data)
            return got, m.type, ws.close_code

    got, kind, code = run(go())
    assert kind in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                    aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.ERROR)
    assert code in (1009, 1006, None)  # too big (or the socket cut)
    serves(server)
    assert server.rss_mb() < baseline + RSS_GROWTH_MB


def _png(width: int, height: int) -> bytes:
    """A valid PNG header claiming `width` x `height` pixels, with a tiny zlib stream."""
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(bytes(width + 1) * 64, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + \
        chunk(b"IEND", b"")


@pytest.mark.slow
def test_image_bomb(server, baseline):
    import json

    from PIL import Image

    jpeg = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(jpeg, "JPEG")
    bombs = [(_png(60000, 60000), "too large"), (_png(1, 1)[:40], "image"),
             (jpeg.getvalue()[:200], "image"), (b"GIF89a" + os.urandom(100), "image"),
             (base64.b64encode(os.urandom(300)), "not an image")]
    for bomb, why in bombs:
        got = run(_session(server, [b"\x08" + bomb, protocol.pcm(np.zeros(1920, np.float32))],
                           audio="pcm"))
        meta = [json.loads(p) for k, p in got if k == protocol.METADATA]
        refused = [m["text"] for m in meta if m.get("level") == "error"]
        assert len(refused) == 1 and why in refused[0], meta
        assert protocol.PCM in [k for k, _ in got]  # the conversation went on
    # A flood of large images: each takes the place of the one still waiting (memory
    # bounded), none is refused as too many commands, the conversation goes on.
    junk = b"\x08" + b"\xff\xd8\xff" + os.urandom(4 << 20)
    got = run(_session(server, [junk] * 40 + [protocol.pcm(np.zeros(1920, np.float32))],
                       audio="pcm"))
    assert not [p for k, p in got if k == protocol.ERROR], got[-2:]
    assert protocol.PCM in [k for k, _ in got]
    serves(server)
    assert server.rss_mb() < baseline + RSS_GROWTH_MB


@pytest.mark.slow
def test_thousand_connections(server, baseline):
    async def cycles(n: int) -> None:
        async with aiohttp.ClientSession() as s:
            for i in range(n):
                ws = await s.ws_connect(server.ws_url(image="none"))
                if i % 2:  # half of them wait for the handshake, half leave at once
                    await ws.receive(timeout=10)
                await ws.close()

    run(cycles(100))
    before = server.rss_mb()
    t0 = time.monotonic()
    run(cycles(1000))
    took = time.monotonic() - t0
    after = server.rss_mb()
    assert after < before + 20, f"{before:.0f} MB -> {after:.0f} MB after 1000 connections"
    assert took < 300
    serves(server)


def _raw_websocket(port: int, path: str, rcvbuf: int = 4096) -> socket.socket:
    """A websocket opened by hand, with a tiny receive buffer: nothing reads it."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                  f"Sec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert b" 101 " in head.split(b"\r\n")[0], head
    return sock


def _frame(payload: bytes) -> bytes:
    """A masked binary websocket frame (clients mask)."""
    mask = os.urandom(4)
    n = len(payload)
    size = bytes([0x80 | n]) if n < 126 else (
        bytes([0x80 | 126]) + struct.pack(">H", n) if n < 65536
        else bytes([0x80 | 127]) + struct.pack(">Q", n))
    masked = (np.frombuffer(payload, np.uint8) ^ np.resize(np.frombuffer(mask, np.uint8), n))
    return b"\x82" + size + mask + masked.tobytes()


@pytest.mark.slow
def test_client_that_stops_reading(server, baseline):
    sock = _raw_websocket(server.port, "/api/chat?image=none&audio=pcm")
    second = protocol.pcm(0.1 * np.random.default_rng(0).standard_normal(24000))
    ended = False
    deadline = time.monotonic() + 90
    try:
        while time.monotonic() < deadline:
            try:
                sock.sendall(_frame(second))
            except OSError:  # reset: the server ended the connection
                ended = True
                break
            time.sleep(0.1)
    finally:
        sock.close()
    assert ended, "the server kept a client that does not read"
    serves(server)


@pytest.mark.slow
def test_idle_client_is_ended(server, baseline):
    async def go() -> list:
        async with aiohttp.ClientSession() as s, s.ws_connect(
                server.ws_url(image="none")) as ws:
            got = [await ws.receive(timeout=10)]
            got.append(await ws.receive(timeout=10))  # the info
            got.append(await ws.receive(timeout=20))
            return got

    got = run(go())
    assert got[2].data[0] == protocol.ERROR and b"idle" in got[2].data


@pytest.mark.slow
def test_memory_flat_at_the_end(server, baseline):
    serves(server)
    assert server.rss_mb() < baseline + RSS_GROWTH_MB, (baseline, server.rss_mb())
    # Every attack was handled, none reached aiohttp's or asyncio's last-resort logging.
    output = "\n".join(server.lines)
    for sign in ("Traceback", "Error handling request", "exception was never retrieved"):
        assert sign not in output, output[-3000:]


def test_other_refusals_are_one_line(tmp_path):
    r = run_app("--serve", "--static", str(tmp_path), "--demo")
    assert r.returncode != 0 and "no index.html" in r.stderr and \
        len(r.stderr.strip().splitlines()) == 1
    r = run_app("--static", str(tmp_path))
    assert r.returncode == 2 and "--static is for --serve" in r.stderr
