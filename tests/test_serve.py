"""moshivis-mlx --serve: the protocol's encoding and bounds, the security policy, and the
real server (the entry point, on the tiny demo model) talked to by a client of our own in
both handshake orders, with Opus and with raw PCM."""

from __future__ import annotations

import asyncio
import json
import signal
import ssl
import time

import numpy as np
import pytest
from serve_support import ServerProcess, converse, run

from moshivis_mlx.app.demo import SAMPLE_IMAGE
from moshivis_mlx.errors import UsageError
from moshivis_mlx.serve import protocol
from moshivis_mlx.serve.protocol import ProtocolError
from moshivis_mlx.serve.security import fingerprint, is_loopback, security_for

# -- the protocol ------------------------------------------------------------------------------


def test_messages_kinds_and_payloads():
    assert protocol.handshake() == b"\x00"
    assert protocol.text("▁hello") == b"\x02 hello"
    assert protocol.colored_text("▁sky", 0.021) == b"\x07\x0a sky"
    assert protocol.metadata({"a": 1}) == b'\x04{"a":1}'
    assert protocol.error("no") == b"\x05no"
    m = protocol.decode(b"\x03\x03")
    assert (m.kind, m.value) == (protocol.CONTROL, protocol.CONTROL_RESTART)
    assert protocol.decode(b"\x0a\x05").value == 5
    assert protocol.decode(b'\x04{"x": [1]}').value == {"x": [1]}


def test_gate_colour_is_moshivis_scale():
    """MoshiVis' servers: round(clamp((gate - 0.005) / 0.016, 0, 1) * 10)."""
    for gate in (0.0, 0.005, 0.009, 0.013, 0.02, 0.021, 0.5):
        want = round(min(max((gate - 0.005) / 0.016, 0.0), 1.0) * 10)
        assert protocol.gate_colour(gate) == want
    assert protocol.gate_colour(None) == 0
    assert protocol.gate_colour(float("nan")) == 0


def test_pcm_round_trip_and_bounds():
    x = np.linspace(-1, 1, 1920, dtype=np.float32)
    back = protocol.decode(protocol.pcm(x)).value
    assert back.dtype == np.float32 and back.shape == (1920,)
    assert np.max(np.abs(back - x)) < 1e-4
    assert protocol.decode(b"\x81" + b"\x00\x00" * protocol.PCM_MAX_SAMPLES).value.shape == (
        24000,)
    with pytest.raises(ProtocolError, match="at most"):
        protocol.decode(b"\x81" + b"\x00\x00" * (protocol.PCM_MAX_SAMPLES + 1))
    with pytest.raises(ProtocolError, match="odd"):
        protocol.decode(b"\x81\x00")


@pytest.mark.parametrize("data, match", [
    (b"", "empty"), (b"\x09", "unknown message kind 0x09"), (b"\xff", "unknown"),
    (b"\x03", "control"), (b"\x03\x07", "control"), (b"\x02\xff\xfe", "UTF-8"),
    (b"\x04{nope", "JSON"), (b"\x08", "without an image"),
    (b"\x06" + b"x" * 65, "at most 64"), (b"\x01" + b"x" * (protocol.MAX_AUDIO_BYTES + 1),
                                           "audio message"),
])
def test_malformed_messages_are_refused(data, match):
    with pytest.raises(ProtocolError, match=match):
        protocol.decode(data)


def test_client_options():
    o = protocol.client_options({"text_temperature": "0.7", "text_topk": "25",
                                 "audio_topk": "250.0", "audio": "pcm", "image": "none",
                                 "pad_mult": "0", "text": "colored", "stats": "1"})
    assert (o.text_temperature, o.text_topk, o.audio_topk) == (0.7, 25, 250)
    assert o.pcm and o.image == "none" and o.colored is True and o.stats
    assert o.ignored == ("pad_mult",)
    for bad in ({"text_temperature": "nan"}, {"text_topk": "-1"}, {"audio": "mp3"},
                {"xa_start": "1e99"}, {"image": "maybe"}):
        with pytest.raises(ProtocolError):
            protocol.client_options(bad)


# -- the security policy -----------------------------------------------------------------------


def test_loopback():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert is_loopback("127.3.2.1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.20")
    assert not is_loopback("no-such-host.invalid")


def test_non_loopback_needs_tls_and_gets_a_token(tmp_path):
    with pytest.raises(UsageError, match="needs TLS"):
        security_for("0.0.0.0", None, None, True, None, tmp_path)
    with pytest.raises(UsageError, match="go together"):
        security_for("127.0.0.1", tmp_path / "c.pem", None, False, None, tmp_path)
    loop = security_for("127.0.0.1", None, None, False, None, tmp_path)
    assert loop.ssl_context is None and loop.token is None and loop.allows(None)
    net = security_for("0.0.0.0", None, None, False, None, tmp_path / "cache")
    assert net.ssl_context is not None and net.token and len(net.token) >= 20
    assert not net.allows(None) and not net.allows("wrong") and net.allows(net.token)
    assert (tmp_path / "cache" / "key.pem").stat().st_mode & 0o077 == 0
    assert net.fingerprint == fingerprint(net.cert) and net.fingerprint.count(":") == 31
    again = security_for("0.0.0.0", None, None, False, "my-own-token", tmp_path / "cache")
    assert again.fingerprint == net.fingerprint  # made once, then reused
    assert again.token == "my-own-token"


# -- the server, with a client of our own --------------------------------------------------------

@pytest.fixture(scope="module")
def server():
    s = ServerProcess().start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def speech():
    t = np.arange(int(2.0 * 24000)) / 24000
    return (0.3 * np.sin(2 * np.pi * 220 * t) * (np.sin(2 * np.pi * 3 * t) > 0)).astype(
        np.float32)


def _spoke(out: dict, seconds: float) -> None:
    assert not out["errors"], out["errors"]
    audio = out["audio"]
    assert len(audio) >= 0.8 * seconds * 24000, len(audio)
    assert np.all(np.isfinite(audio)) and float(np.sqrt(np.mean(audio**2))) > 1e-3
    assert "".join(out["text"]).strip(), "no text came back"


@pytest.mark.slow
def test_moshi_order_opus(server, speech):
    """Moshi's order: `image=none` (or no image sent): the handshake comes first, text as
    0x02, then the info metadata."""
    out = run(converse(server.ws_url(image="none"), speech))
    assert out["kinds"][0] == protocol.HANDSHAKE and out["kinds"][1] == protocol.METADATA
    assert out["metadata"][0]["type"] == "info" and out["metadata"][0]["audio"] == "opus"
    assert protocol.COLORED_TEXT not in out["kinds"]
    _spoke(out, 3.0)


@pytest.mark.slow
def test_moshivis_order_image_first_coloured_text(server, speech):
    """MoshiVis' order: the client's image first, then the handshake; text as 0x07 with
    the gate's colour; the image's news after the handshake."""
    out = run(converse(server.ws_url(), speech, image=SAMPLE_IMAGE.read_bytes()))
    assert out["kinds"][0] == protocol.HANDSHAKE
    assert protocol.TEXT not in out["kinds"] and out["colours"]
    assert all(0 <= c <= 10 for c in out["colours"])
    assert {"type": "image", "name": "image"} in out["metadata"]
    assert out["metadata"][0]["text"] == "colored"
    _spoke(out, 3.0)


@pytest.mark.slow
def test_nothing_of_a_conversation_stays(server, speech):
    """The next conversation does not see the last one's picture: its words carry no gate
    (colour 0 throughout), where the one with the picture had them."""
    with_image = run(converse(server.ws_url(), speech, image=SAMPLE_IMAGE.read_bytes()))
    assert any(c > 0 for c in with_image["colours"]), with_image["colours"]
    after = run(converse(server.ws_url(image="none", text="colored"), speech))
    assert after["colours"] and all(c == 0 for c in after["colours"]), after["colours"]
    assert after["metadata"][0]["image"] is None


@pytest.mark.slow
def test_raw_pcm_both_ways(server, speech):
    out = run(converse(server.ws_url(audio="pcm", image="none"), speech, pcm=True))
    assert protocol.AUDIO not in out["kinds"] and protocol.PCM in out["kinds"]
    assert out["metadata"][0]["audio"] == "pcm"
    _spoke(out, 3.0)


@pytest.mark.slow
def test_second_client_is_told_busy_and_first_goes_on(server, speech):
    import aiohttp

    async def both() -> tuple[dict, list]:
        first = asyncio.create_task(converse(server.ws_url(image="none"), speech))
        await asyncio.sleep(1.0)
        async with aiohttp.ClientSession() as s, s.ws_connect(server.ws_url()) as ws:
            got = [await ws.receive(timeout=10), await ws.receive(timeout=10)]
        return await first, got

    out, got = run(both())
    assert got[0].data[0] == protocol.ERROR and b"busy" in got[0].data
    assert got[1].type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    _spoke(out, 3.0)


@pytest.mark.slow
def test_controls_ping_and_an_image_mid_conversation(server):
    import aiohttp

    async def go() -> list:
        got = []
        async with aiohttp.ClientSession() as s, s.ws_connect(
                server.ws_url(image="none", audio="pcm")) as ws:
            assert (await ws.receive(timeout=10)).data == b"\x00"
            await ws.send_bytes(b"\x06abc")
            await ws.send_bytes(b"\x03\x03")  # restart
            await ws.send_bytes(b"\x08" + SAMPLE_IMAGE.read_bytes())
            await ws.send_bytes(b"\x08" + b"not an image at all")
            await ws.send_bytes(b"\x0a\x04")  # a rating
            await ws.send_bytes(protocol.pcm(np.zeros(1920 * 3, np.float32)))
            while len([m for m in got if m[0] == protocol.PCM]) < 3:
                got.append((await ws.receive(timeout=20)).data)
        return got

    got = run(go())
    assert b"\x06abc" in got
    meta = [json.loads(m[1:]) for m in got if m[0] == protocol.METADATA]
    assert {"type": "restarted"} in meta and {"type": "image", "name": "image"} in meta
    bad = [m for m in meta if m.get("level") == "error"]
    assert bad and "image" in bad[0]["text"]


@pytest.mark.slow
def test_static_page_and_cross_origin_refusal(server):
    import aiohttp

    async def go() -> tuple:
        async with aiohttp.ClientSession() as s:
            async with s.get(server.base + "/") as r:
                page = (r.status, await r.text())
            async with s.get(server.base + "/../../etc/passwd") as r:
                escape = r.status
            try:
                async with s.ws_connect(server.ws_url(),
                                        headers={"Origin": "http://evil.example"}):
                    cross = "connected"
            except aiohttp.WSServerHandshakeError as e:
                cross = e.status
        return page, escape, cross

    page, escape, cross = run(go())
    assert page[0] == 200 and "<html" in page[1].lower()
    assert escape in (403, 404)
    assert cross == 403


@pytest.mark.slow
def test_network_bind_tls_and_token(tmp_path, speech):
    """Off the loopback: TLS with a self-signed certificate (its fingerprint printed) and
    a token; without the token nothing is served."""
    import aiohttp
    from app_support import app_env

    s = ServerProcess("--host", "0.0.0.0", env=app_env(XDG_CACHE_HOME=str(tmp_path),
                                                        MOSHIVIS_MLX_CACHE=str(tmp_path)))
    s.start()
    try:
        assert s.scheme == "https" and s.token
        assert any("SHA-256 fingerprint" in line for line in s.lines)
        insecure = ssl.create_default_context()
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE

        async def go() -> tuple:
            async with aiohttp.ClientSession() as c:
                async with c.get(s.base + "/", ssl=insecure) as r:
                    no_token = r.status
                async with c.get(s.base + f"/?token={s.token}", ssl=insecure) as r:
                    with_token = r.status
                    cookie = r.cookies.get("moshivis_token")
                try:
                    async with c.ws_connect(s.ws_url(), ssl=insecure):
                        ws_no_token = "connected"
                except aiohttp.WSServerHandshakeError as e:
                    ws_no_token = e.status
            return no_token, with_token, cookie, ws_no_token

        no_token, with_token, cookie, ws_no_token = run(go())
        assert (no_token, with_token, ws_no_token) == (401, 200, 401)
        assert cookie is not None and cookie["httponly"] and cookie["secure"]
        out = run(converse(s.ws_url(token=s.token, image="none"), speech[:24000],
                           ssl=insecure))
        _spoke(out, 2.0)
    finally:
        s.stop()


@pytest.mark.slow
def test_served_conversations_recorded_only_when_asked(tmp_path, speech):
    s = ServerProcess("--record", str(tmp_path / "rec"))
    s.start()
    try:
        out = run(converse(s.ws_url(image="none"), speech[:24000]))
        _spoke(out, 2.0)
        run(converse(s.ws_url(image="none"), speech[:12000], seconds_after=1.0))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            sessions = sorted((tmp_path / "rec").glob("*/session.json"))
            if len(sessions) == 2 and all(json.loads(f.read_text())["complete"]
                                          for f in sessions):
                break
            time.sleep(0.2)
        s.process.send_signal(signal.SIGINT)  # Ctrl-C: how a server is stopped
        assert s.process.wait(timeout=30) == 0
        deadline = time.monotonic() + 5  # the reader thread takes the last lines
        while not any("stopped:" in line for line in s.lines) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "stopped: 2 conversation(s) served, 0 refused as busy" in s.lines[-1]
    finally:
        s.stop()
    assert len(sessions) == 2, sessions
    first = json.loads(sessions[0].read_text())
    assert first["served"] and first["complete"] and first["duration_s"] >= 2.0
    assert (sessions[0].parent / "conversation.wav").stat().st_size > 2 * 24000 * 4
    assert json.loads((sessions[0].parent / "transcript.json").read_text())["words"]
