"""The web page served at / (moshivis_mlx/serve/static/): its pure modules under node
(Ogg pages and checksums, Kyutai's message framing and our PCM messages, the resampler,
the gate colours), checked against independent implementations (sphn's Ogg Opus reader
and writer, a bit-by-bit CRC, the terminal UI's colour scale)."""

from __future__ import annotations

import struct

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
        import { decodeMessage, encodePcm, encodeImage, encodeControl, KIND } from './protocol.js';
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
    assert d[4] == {"kind": "error", "text": "busy"} and d[5] == {"kind": "ping"}
    assert d[6] == {"kind": "unknown", "code": 0x42}
    assert got["kinds"]["PCM"] == 0x81 and got["kinds"]["COLORED_TEXT"] == 0x07


@node
def test_resampler_keeps_the_voice_band_and_drops_what_would_fold():
    """48 kHz -> 24 kHz: a 1 kHz tone keeps its level (fed in 128-sample blocks, as the
    audio thread delivers them), a 20 kHz tone (which would fold to 4 kHz) is gone."""
    got = run_js("""
        import { Resampler, rms } from './resample.js';
        output = input.map((f) => {
          const r = new Resampler(48000, 24000);
          const x = Float32Array.from({ length: 48000 },
                                      (_, i) => 0.5 * Math.sin(2 * Math.PI * f * i / 48000));
          const parts = [];
          for (let at = 0; at < x.length; at += 128) {
            parts.push(...r.push(x.subarray(at, at + 128)));
          }
          return [parts.length, rms(Float32Array.from(parts.slice(2400)))];
        });
    """, [1000, 20000])
    (n1, level1), (n2, level2) = got
    assert abs(n1 - 24000) < 40 and abs(n2 - 24000) < 40
    assert level1 == pytest.approx(0.5 / np.sqrt(2), rel=0.02)
    assert level2 < 0.01


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
