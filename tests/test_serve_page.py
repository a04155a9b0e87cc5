"""The web page served at / (moshivis_mlx/serve/static/): its pure modules under node
(Ogg pages and checksums, Kyutai's message framing and our PCM messages, the resampler,
the gate colours), checked against independent implementations (sphn's Ogg Opus reader
and writer, a bit-by-bit CRC, the terminal UI's colour scale)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import struct
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from page_support import ogg_crc, ogg_pages, run_js

node = pytest.mark.system("node")


def sphn_stream(seconds: float = 1.0) -> tuple[bytes, np.ndarray]:
    """An Ogg Opus stream written by sphn (as Kyutai's servers write theirs), and the
    sine it encodes."""
    import sphn

    t = np.arange(int(24000 * seconds)) / 24000
    pcm = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    writer = sphn.OpusStreamWriter(24000)
    data = b"".join(writer.append_pcm(pcm[i:i + 1920]) for i in range(0, len(pcm), 1920))
    return data, pcm


def sphn_decode(data: bytes) -> np.ndarray:
    import sphn

    return sphn.OpusStreamReader(24000).append_bytes(data)


@node
def test_crc_is_oggs():
    data = list(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8))
    got = run_js("import { oggCrc } from './ogg.js';"
                 "output = [oggCrc(new TextEncoder().encode('123456789')),"
                 " oggCrc(Uint8Array.from(input))];", [int(b) for b in data])
    assert got[0] == 0x89A1897F  # CRC-32 with Ogg's parameters, on the standard check string
    assert got[1] == ogg_crc(bytes(data))


@node
def test_ogg_reader_and_writer_against_sphn():
    """Packets read from sphn's stream (fed in odd-sized pieces, as websocket messages cut
    it) and written again make a stream that sphn decodes to the same sound."""
    stream, _ = sphn_stream()
    got = run_js("""
        import { OggReader, OggOpusWriter, parseOpusHead, concat } from './ogg.js';
        const data = Uint8Array.from(input);
        const reader = new OggReader();
        const packets = [];
        for (let at = 0, n = 1; at < data.length; at += n, n = (n * 7) % 97 + 1) {
          packets.push(...reader.push(data.subarray(at, at + n)));
        }
        const head = parseOpusHead(packets[0].data);
        const writer = new OggOpusWriter({
          serial: 1234, preSkip: head.preSkip, inputRate: head.inputRate });
        const parts = [writer.headers()];
        let previous = 0;
        for (const p of packets.slice(2)) {
          parts.push(writer.packet(p.data, p.granule - previous));
          previous = p.granule;
        }
        output = { head, tags: String.fromCharCode(...packets[1].data.subarray(0, 8)),
                   count: packets.length, bad: reader.badPages,
                   stream: Array.from(concat(parts)) };
    """, list(stream))
    assert got["tags"] == "OpusTags" and got["bad"] == 0
    ours = bytes(got["stream"])
    pages = ogg_pages(ours)
    theirs = ogg_pages(stream)
    head = struct.unpack("<BBHIhB", theirs[0]["body"][8:19])
    version, channels, pre_skip, rate, gain, family = head
    assert got["head"] == {"version": version, "channels": channels, "preSkip": pre_skip,
                           "inputRate": rate, "outputGain": gain, "mappingFamily": family}
    assert channels == 1
    assert got["count"] == len(theirs)  # one packet per page in sphn's stream
    assert pages[0]["flags"] == 0x02 and pages[0]["body"].startswith(b"OpusHead")
    assert pages[1]["body"].startswith(b"OpusTags")
    assert [p["sequence"] for p in pages] == list(range(len(pages)))
    assert [p["granule"] for p in pages[2:]] == [p["granule"] for p in theirs[2:]]
    assert [p["body"] for p in pages[2:]] == [p["body"] for p in theirs[2:]]
    a, b = sphn_decode(stream), sphn_decode(ours)
    assert len(a) > 20000 and np.array_equal(a, b)


@node
def test_ogg_reader_drops_corrupt_pages_and_skips_garbage():
    stream, _ = sphn_stream(0.5)
    pages = ogg_pages(stream)
    data = bytearray(stream)
    victim = sum(27 + len(p["lacing"]) + len(p["body"]) for p in pages[:4]) + 30
    data[victim] ^= 0xFF  # inside page 4's header or body: its checksum no longer holds
    data = b"garbage before the stream" + bytes(data)
    got = run_js("""
        import { OggReader } from './ogg.js';
        const reader = new OggReader();
        const packets = reader.push(Uint8Array.from(input));
        output = { sizes: packets.map((p) => p.data.length),
                   bad: reader.badPages, skipped: reader.skippedBytes };
    """, list(data))
    assert got["bad"] == 1
    assert got["skipped"] >= len(b"garbage before the stream")
    assert got["sizes"] == [len(p["body"]) for i, p in enumerate(pages) if i != 4]


def with_serial(data: bytes, serial: int) -> bytes:
    """An Ogg stream with its pages' serial number changed (checksums made again)."""
    out = bytearray()
    for p in ogg_pages(data):
        raw = bytearray(b"OggS" + struct.pack("<BBqIIIB", 0, p["flags"], p["granule"], serial,
                                              p["sequence"], 0, len(p["lacing"]))
                        + bytes(p["lacing"]) + p["body"])
        raw[22:26] = struct.pack("<I", ogg_crc(bytes(raw)))
        out += raw
    return bytes(out)


@node
def test_ogg_reader_follows_a_chained_stream():
    """A server that starts its encoder afresh sends a new stream (OpusHead first): the
    reader follows it, and marks where it began."""
    first, _ = sphn_stream(0.3)
    second = with_serial(sphn_stream(0.2)[0], ogg_pages(first)[0]["serial"] ^ 0x5A5A5A5A)
    got = run_js("""
        import { OggReader } from './ogg.js';
        const reader = new OggReader();
        const packets = reader.push(Uint8Array.from(input));
        output = packets.map((p) => [p.first, String.fromCharCode(...p.data.subarray(0, 8))]);
    """, list(first + second))
    n1, n2 = len(ogg_pages(first)), len(ogg_pages(second))
    assert len(got) == n1 + n2
    assert [i for i, (first_, _) in enumerate(got) if first_] == [0, n1]
    assert got[n1][1] == "OpusHead" and got[n1 + 1][1] == "OpusTags"


@node
def test_ogg_packets_spanning_pages():
    """A packet over 255 lacing values (65,025 bytes) continues on the next page, and the
    reader puts it back together; sizes on a lacing boundary (255, 510) end with a 0."""
    sizes = [70000, 255, 510, 3, 0]
    got = run_js("""
        import { OggReader, OggOpusWriter } from './ogg.js';
        const writer = new OggOpusWriter({ serial: 5 });
        const reader = new OggReader();
        const stream = [writer.headers()];
        for (const [i, n] of input.entries()) {
          stream.push(writer.packet(new Uint8Array(n).fill(i + 1), 960));
        }
        const packets = stream.flatMap((bytes) => reader.push(bytes));
        output = { stream: stream.flatMap((s) => Array.from(s)),
                   packets: packets.slice(2).map((p) => [
                     p.data.length, p.data[0] ?? null, p.data.every((b) => b === p.data[0])]) };
    """, sizes)
    assert got["packets"] == [[n, i + 1 if n else None, True] for i, n in enumerate(sizes)]
    pages = ogg_pages(bytes(got["stream"]))
    big = [p for p in pages if p["body"][:1] == b"\x01"]
    assert len(big) == 2 and big[0]["granule"] == -1 and big[1]["flags"] & 0x01
    assert big[1]["granule"] == 960
    assert pages[3 + 1]["lacing"] == [255, 0] and pages[3 + 2]["lacing"] == [255, 255, 0]


@node
def test_message_framing():
    got = run_js("""
        import { decodeMessage, encodePcm, encodeImage, encodeControl, encodePing, KIND }
          from './protocol.js';
        const ramp = Float32Array.from({ length: 30000 }, (_, i) => (i % 200) / 100 - 1);
        const pcm = encodePcm(ramp);
        const enc = new TextEncoder();
        const msg = (kind, bytes) => Uint8Array.from([kind, ...bytes]);
        output = {
          pcm: pcm.map((m) => [m[0], m.length, Array.from(m.subarray(1, 7))]),
          back: Array.from(decodeMessage(pcm[1]).samples.subarray(0, 3)),
          empty: encodePcm(new Float32Array(0)).map((m) => m.length),
          image: Array.from(encodeImage(Uint8Array.from([1, 2, 3]))),
          restart: Array.from(encodeControl('restart')),
          decoded: [
            decodeMessage(msg(0x00, [0, 0])),
            decodeMessage(msg(0x02, enc.encode(' hello'))),
            decodeMessage(msg(0x07, [7, ...enc.encode(' café')])),
            decodeMessage(msg(0x04, enc.encode('{"a": 1}'))),
            decodeMessage(msg(0x05, enc.encode('busy'))),
            decodeMessage(msg(0x06, [])),
            decodeMessage(encodePing(1234.5)),
            decodeMessage(msg(0x42, [1])),
          ],
          kinds: KIND,
        };
    """)
    assert got["pcm"][0][:2] == [0x81, 1 + 2 * 24000]
    assert got["pcm"][1][:2] == [0x81, 1 + 2 * 6000]
    first = np.frombuffer(bytes(got["pcm"][0][2]), "<i2")
    assert list(first) == [-32767, round(-0.99 * 32767), round(-0.98 * 32767)]
    expected = [(24000 % 200) / 100 - 1 + k / 100 for k in range(3)]
    assert got["back"] == pytest.approx(expected, abs=1e-4)
    assert got["empty"] == [1]
    assert got["image"] == [0x08, 1, 2, 3] and got["restart"] == [0x03, 0x03]
    d = got["decoded"]
    assert d[0]["kind"] == "handshake"
    assert d[1] == {"kind": "text", "text": " hello"}
    assert d[2] == {"kind": "coloredtext", "color": 7, "text": " café"}
    assert d[3] == {"kind": "metadata", "data": {"a": 1}}
    assert d[4] == {"kind": "error", "text": "busy"} and d[5] == {"kind": "ping", "sent": None}
    assert d[6] == {"kind": "ping", "sent": 1234.5}
    assert d[7] == {"kind": "unknown", "code": 0x42}
    assert got["kinds"]["PCM"] == 0x81 and got["kinds"]["COLORED_TEXT"] == 0x07


@node
def test_resampler_keeps_the_voice_band_and_drops_what_would_fold():
    """48 or 44.1 kHz -> 24 kHz: a 1 kHz tone keeps its level and pitch (fed in 128-sample
    blocks, as the audio thread delivers them), a 20 kHz tone (which would fold to 4 kHz)
    is gone."""
    got = run_js("""
        import { Resampler } from './resample.js';
        output = input.map(([rate, f]) => {
          const r = new Resampler(rate, 24000);
          const x = Float32Array.from({ length: rate },
                                      (_, i) => 0.5 * Math.sin(2 * Math.PI * f * i / rate));
          const parts = [];
          for (let at = 0; at < x.length; at += 128) {
            parts.push(...r.push(x.subarray(at, at + 128)));
          }
          return parts;
        });
    """, [[48000, 1000], [48000, 20000], [44100, 1000], [44100, 20000]])
    for (tone, alias) in (got[0:2], got[2:4]):
        assert abs(len(tone) - 24000) < 40 and abs(len(alias) - 24000) < 40
        y = np.array(tone[2400:24000 - 2400])
        assert np.sqrt(np.mean(y ** 2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.02)
        spectrum = np.abs(np.fft.rfft(y * np.hanning(len(y))))
        assert np.argmax(spectrum) * 24000 / len(y) == pytest.approx(1000, abs=3)
        assert np.sqrt(np.mean(np.array(alias[2400:]) ** 2)) < 0.01


@node
def test_gate_colours_match_the_terminal():
    from moshivis_mlx.app.ui import GateScale, gate_rgb

    gates = [0.0, 0.1, 0.35, 0.5, 0.69, 0.7, 0.9, 1.0, 1.4, -0.2]
    recent = [0.011, 0.02, 0.025, 0.013, 0.05]
    got = run_js("""
        import { gateRgb, GateScale, gateOfColor } from './gate.js';
        const scale = new GateScale();
        for (const g of input.recent) scale.add(g);
        const flat = new GateScale();
        flat.add(0.02); flat.add(0.021);
        output = { rgb: input.gates.map(gateRgb), bounds: scale.bounds(), flat: flat.bounds(),
                   colours: [0, 5, 10, 12].map(gateOfColor) };
    """, {"gates": gates, "recent": recent})
    assert [tuple(c) for c in got["rgb"]] == [gate_rgb(g) for g in gates]
    scale, flat = GateScale(), GateScale()
    for g in recent:
        scale.add(g)
    flat.add(0.02)
    flat.add(0.021)
    assert got["bounds"] == pytest.approx(list(scale.bounds()))
    assert got["flat"] == pytest.approx(list(flat.bounds()))
    # MoshiVis' colour byte is round(clamp((gate - 0.005) / 0.016) * 10)
    assert got["colours"] == pytest.approx([0.005, 0.013, 0.021, 0.021])


# -- the page in headless Chromium against the server on the tiny random model -------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`moshivis-mlx --serve` on the tiny random bundle, on a free loopback port: its URL."""
    from app_support import APP, app_env, demo_bundle

    log_path = tmp_path_factory.mktemp("server") / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([*APP, "--serve", "--weights", str(demo_bundle()), "--port", "0"],
                                stdout=log, stderr=subprocess.STDOUT, env=app_env())
    try:
        deadline = time.monotonic() + 180
        while not (found := re.search(r"serving on (http://\S+)", log_path.read_text())):
            assert proc.poll() is None, f"the server exited:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, f"the server did not start:\n{log_path.read_text()}"
            time.sleep(0.2)
        yield found.group(1)
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def question(tmp_path_factory):
    """A spoken question as Chromium's fake microphone plays it (48 kHz, 16-bit)."""
    from app_support import speech_wav

    path = tmp_path_factory.mktemp("speech") / "question.wav"
    return speech_wav(path, "What do you see in this picture? Tell me about the colours.",
                      rate=48000)


STATS = "window.moshivis.stats()"


async def wait_for(browser, condition: str, timeout: float = 90) -> dict:
    """Polls the page's stats until `condition` (a JavaScript expression over `s`) holds."""
    deadline = time.monotonic() + timeout
    while True:
        if await browser.evaluate(f"(s => Boolean({condition}))({STATS})"):
            return await browser.evaluate(STATS)
        if time.monotonic() > deadline:
            stats = await browser.evaluate(STATS)
            raise AssertionError(f"the page never got {condition}: {stats} {browser.errors}")
        await asyncio.sleep(0.25)


WITHOUT_WEBCODECS = "delete window.AudioEncoder; delete window.AudioDecoder;"
"""Run before the page's own scripts: a browser without WebCodecs audio (Safari before
version 26, for one)."""


@pytest.mark.slow
@pytest.mark.system("chromium", "espeak-ng", "sox", "pulseaudio")
@pytest.mark.parametrize("audio, query, prelude, picture", [
    ("opus", "", None, "file"),
    ("pcm", "?audio=pcm", None, "camera"),
    ("pcm", "", WITHOUT_WEBCODECS, "file"),
    ("opus", "", None, None),
], ids=["webcodecs-opus", "forced-pcm", "no-webcodecs", "no-picture"])
def test_conversation_in_chromium(server, question, audio, query, prelude, picture, tmp_path):
    """The page in headless Chromium: a picture from the file picker or the (fake)
    camera's snapshot, the spoken question from the fake microphone, the model's voice
    played (recorded from the browser's speaker, a PulseAudio null sink, and measured
    where the page plays it) while its words appear coloured. Audio as
    Ogg Opus through WebCodecs; as PCM when the page is opened with ?audio=pcm, or by
    itself in a browser without WebCodecs audio. Without a picture the server sends its
    handshake first (Moshi's order) and plain text. Then a restart on the same connection."""
    from app_support import PulseServer
    from page_support import Browser

    from moshivis_mlx.app.demo import SAMPLE_IMAGE

    pulse = PulseServer(rate=48000).start()
    speaker = tmp_path / "speaker.raw"
    recording = pulse.record_speaker(speaker)

    async def talk() -> tuple[dict, dict]:
        async with Browser(tmp_path, question, env=pulse.client_env()) as b:
            if prelude:
                await b.call("Page.addScriptToEvaluateOnNewDocument", source=prelude)
            await b.open(server + query)
            if picture == "file":
                await b.choose_file("#file", SAMPLE_IMAGE)
            elif picture == "camera":
                await b.evaluate("document.getElementById('camera').click()", gesture=True)
                await wait_for(b, "!document.getElementById('snap').hidden", 20)
                await asyncio.sleep(0.5)  # a few frames from the fake camera
                await b.evaluate("document.getElementById('snap').click()", gesture=True)
            if picture:
                await wait_for(b, "s.picture > 0", 20)
            await b.evaluate("document.getElementById('start').click()", gesture=True)
            s = await wait_for(b, "s.state === 'live' && s.receivedSeconds >= 4"
                                  " && s.transcript.trim().split(/\\s+/).length >= 5")
            await b.screenshot(tmp_path / "page.png")
            await b.screenshot(tmp_path / "phone.png", 390, 844, 2)
            await b.evaluate("document.getElementById('restart').click()", gesture=True)
            more = s["receivedSeconds"] + 1  # and the voice goes on after it
            after = await wait_for(b, "s.metadata.some((m) => m.type === 'restarted')"
                                      f" && s.receivedSeconds >= {more}", 30)
            await b.evaluate("document.getElementById('start').click()", gesture=True)  # stop
            return s, after

    try:
        s, after = asyncio.run(talk())
    finally:
        recording.terminate()
        recording.wait(10)
        pulse.stop()
    assert s["path"] == audio and s["handshakes"] == 1 and s["errors"] == []
    assert s["sentSeconds"] >= 4  # the microphone's frames went out ...
    assert s["receivedSeconds"] >= 4  # ... and the model answered each (it steps on them)
    # The server read the picture (its news comes back as metadata) before the handshake.
    assert any(m.get("type") == "image" for m in s["metadata"]) == bool(picture)
    # The voice actually played: samples through the player at the context's rate, not silent.
    assert s["playedSamples"] >= 2 * 24000
    assert s["playedRms"] > 1e-3 and s["scheduledRms"] > 1e-3 and s["playedPeak"] <= 1.0
    # ... and reached the sound system: the speaker's recording (24 kHz) is not silent.
    heard = np.frombuffer(speaker.read_bytes(), "<i2").astype(np.float32) / 32768
    voiced = heard[np.abs(heard) > 1e-3]
    assert len(voiced) >= 24000 and np.sqrt(np.mean(voiced ** 2)) > 1e-2
    assert s["transcript"].strip()
    if picture:  # MoshiVis' order: coloured text, each word with its gate
        assert s["words"] >= 5 and s["messages"].get("coloredtext", 0) >= 5
    else:  # Moshi's: plain text
        assert s["words"] == 0 and s["messages"].get("text", 0) >= 5
    # The status line's latencies: the model's step time and the socket's round trip.
    assert 0 < s["stepMs"] < 10_000 and 0 <= s["roundTripMs"] < 5_000
    assert after["state"] == "live" and after["connections"] == 1
    assert "[restarted]" in after["transcript"]
    for name in ("page.png", "phone.png"):
        png = (tmp_path / name).read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 20_000
    keep = os.environ.get("MOSHIVIS_PAGE_SCREENSHOTS")
    if keep and audio == "opus":  # docs/serve-page.png and docs/serve-page-phone.png
        shutil.copy(tmp_path / "page.png", Path(keep) / "serve-page.png")
        shutil.copy(tmp_path / "phone.png", Path(keep) / "serve-page-phone.png")


def dominant_hz(samples: np.ndarray, rate: float) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.argmax(spectrum) * rate / len(samples))


@pytest.mark.slow
@pytest.mark.system("chromium", "espeak-ng", "sox")
def test_webcodecs_opus_through_our_ogg_in_chromium(server, question, tmp_path):
    """The page's Opus path on its own, in Chromium: what OpusSender writes (WebCodecs'
    packets in our Ogg pages) is a valid stream of 20 ms pages that sphn decodes to the
    tone it was given; what OpusReceiver makes of sphn's stream, fed in odd-sized pieces,
    is sphn's tone again."""
    import sphn
    from page_support import Browser

    t = np.arange(12000) / 24000
    theirs = sphn.OpusStreamWriter(24000).append_pcm((0.3 * np.sin(2 * np.pi * 660 * t))
                                                     .astype(np.float32))

    async def run_page() -> tuple[dict, dict]:
        async with Browser(tmp_path, question) as b:
            await b.open(server)
            sent = await b.evaluate("""(async () => {
                const { OpusSender, webCodecsOpus } = await import('./codec.js');
                const config = await webCodecsOpus();
                const messages = [], errors = [];
                const sender = new OpusSender(config, (m) => messages.push(Array.from(m)),
                                              (e) => errors.push(e));
                for (let k = 0; k < 50; k++) {
                  sender.send(Float32Array.from({ length: 480 },
                    (_, i) => 0.3 * Math.sin(2 * Math.PI * 440 * (k * 480 + i) / 24000)));
                }
                await sender.encoder.flush();
                sender.close();
                return { config, messages, errors };
            })()""")
            received = await b.evaluate("""(async (bytes) => {
                const { OpusReceiver } = await import('./codec.js');
                const samples = [], errors = [];
                let rate = 0;
                const receiver = new OpusReceiver((s, r) => { samples.push(...s); rate = r; },
                                                  (e) => errors.push(e));
                const data = Uint8Array.from(bytes);
                for (let at = 0, n = 1; at < data.length; at += n, n = (n * 13) % 301 + 1) {
                  receiver.receive(data.subarray(at, at + n));
                }
                await receiver.decoder.flush();
                return { samples, rate, errors };
            })(""" + json.dumps(list(theirs)) + ")")
        return sent, received

    sent, received = asyncio.run(run_page())
    assert sent["errors"] == [] and received["errors"] == []
    assert sent["config"]["codec"] == "opus" and sent["config"]["sampleRate"] == 24000
    messages = [bytes(m) for m in sent["messages"]]
    assert all(m[0] == 0x01 for m in messages)
    ogg = b"".join(m[1:] for m in messages)
    pages = ogg_pages(ogg)  # every checksum checked
    assert [len(ogg_pages(m[1:])) for m in messages] == [2] + [1] * (len(messages) - 1)
    assert pages[0]["flags"] == 0x02 and pages[0]["body"].startswith(b"OpusHead")
    assert pages[1]["body"].startswith(b"OpusTags")
    granules = [p["granule"] for p in pages[2:]]
    # 50 frames of 20 ms (and one more when the flush pushes out the encoder's look-ahead)
    assert len(granules) in (50, 51) and granules[0] == 960 and np.all(np.diff(granules) == 960)
    ours = sphn_decode(ogg)
    assert len(ours) >= 23000
    middle = ours[4800:19200]
    assert np.sqrt(np.mean(middle ** 2)) == pytest.approx(0.3 / np.sqrt(2), rel=0.15)
    assert dominant_hz(middle, 24000) == pytest.approx(440, abs=5)

    played = np.array(received["samples"], dtype=np.float32)
    rate = received["rate"]
    # 0.48 s sent in 40 ms packets, less the 80 ms pre-skip sphn's header declares (the
    # receiver drops it, as RFC 7845 says) and the packets Chromium's decoder holds back
    assert rate in (24000, 48000) and 0.3 * rate <= len(played) <= 0.38 * rate
    middle = played[int(0.05 * rate):-int(0.05 * rate)]
    assert np.sqrt(np.mean(middle ** 2)) == pytest.approx(0.3 / np.sqrt(2), rel=0.15)
    assert dominant_hz(middle, rate) == pytest.approx(660, abs=5)


@pytest.mark.slow
@pytest.mark.system("chromium", "espeak-ng", "sox")
def test_page_says_busy_and_lets_the_microphone_go(server, question, tmp_path):
    """While another client holds the conversation, the page shows the server's reason,
    closes, and releases the microphone; once the other has left, Start talks."""
    import aiohttp
    from page_support import Browser

    async def run_page() -> tuple[dict, bool, dict]:
        async with aiohttp.ClientSession() as http, Browser(tmp_path, question) as b:
            ws_url = server.replace("http", "ws", 1) + "api/chat?image=none"
            async with http.ws_connect(ws_url) as other:
                assert (await other.receive_bytes(timeout=30))[:1] == b"\x00"
                await b.open(server)
                await b.evaluate("document.getElementById('start').click()", gesture=True)
                busy = await wait_for(b, "s.state === 'closed' && s.errors.length > 0", 30)
                mic_free = not await b.evaluate("window.moshivis.stats().microphoneOpen")
            await asyncio.sleep(1)  # the server lets the other conversation go
            await b.evaluate("document.getElementById('start').click()", gesture=True)
            talking = await wait_for(b, "s.state === 'live' && s.receivedSeconds >= 1", 60)
            return busy, mic_free, talking

    busy, mic_free, talking = asyncio.run(run_page())
    assert any("busy" in e for e in busy["errors"]) and busy["handshakes"] == 0
    assert mic_free
    assert talking["handshakes"] == 1 and talking["connections"] == 2
