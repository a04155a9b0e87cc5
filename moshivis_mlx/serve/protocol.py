"""Kyutai's websocket protocol, as Moshi's and MoshiVis' servers and clients speak it, plus
one extension of ours (raw PCM audio, 0x81).

Every message is binary: one kind byte, then the payload.

    0x00 handshake      server -> client: the conversation is ready (empty payload)
    0x01 audio          Ogg Opus pages, 24 kHz mono, both ways
    0x02 text           UTF-8: a piece of the model's words ("▁" already made a space)
    0x03 control        one byte: 0 start, 1 end of turn, 2 pause, 3 restart
    0x04 metadata       UTF-8 JSON
    0x05 error          UTF-8: why the server ends the connection (always its last message)
    0x06 ping           echoed back with its payload (a client measures the round trip)
    0x07 coloured text  one byte, the gate as 0..10, then UTF-8 as 0x02 (MoshiVis)
    0x08 image          client -> server: an image file's bytes (JPEG, PNG, HEIC, ...)
    0x0A rating         client -> server: one byte (accepted and ignored)
    0x81 PCM audio      ours: 16-bit signed little-endian mono PCM at 24 kHz, both ways

Decoding is bounded: each kind has its largest payload, and anything else (an unknown kind,
an empty message, a payload over its bound, text that is not UTF-8, JSON that does not
parse, a control byte out of range) is a `ProtocolError`, which ends that connection.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

HANDSHAKE = 0x00
AUDIO = 0x01
TEXT = 0x02
CONTROL = 0x03
METADATA = 0x04
ERROR = 0x05
PING = 0x06
COLORED_TEXT = 0x07
IMAGE = 0x08
RATING = 0x0A
PCM = 0x81

NAMES = {HANDSHAKE: "handshake", AUDIO: "audio", TEXT: "text", CONTROL: "control",
         METADATA: "metadata", ERROR: "error", PING: "ping", COLORED_TEXT: "coloured text",
         IMAGE: "image", RATING: "rating", PCM: "PCM audio"}

CONTROL_START, CONTROL_END_TURN, CONTROL_PAUSE, CONTROL_RESTART = 0, 1, 2, 3

SAMPLE_RATE = 24000
PCM_MAX_SAMPLES = 24000
"""A 0x81 message carries at most one second of audio."""
MAX_IMAGE_BYTES = 16 << 20
"""An image message: a phone's photo is a few MB; decoding is bounded by image.py."""
MAX_AUDIO_BYTES = 256 << 10
"""An Ogg Opus message: a page is at most ~64 KB, a client may send a few at once."""
MAX_SMALL_BYTES = 8 << 10
"""Text, metadata, error, ping and the one-byte messages."""
MAX_MESSAGE_BYTES = 1 + MAX_IMAGE_BYTES
"""The websocket's own bound: a larger message is refused before it is read."""

LIMITS = {HANDSHAKE: MAX_SMALL_BYTES, AUDIO: MAX_AUDIO_BYTES, TEXT: MAX_SMALL_BYTES,
          CONTROL: 1, METADATA: MAX_SMALL_BYTES, ERROR: MAX_SMALL_BYTES, PING: 64,
          COLORED_TEXT: MAX_SMALL_BYTES, IMAGE: MAX_IMAGE_BYTES, RATING: 1,
          PCM: 2 * PCM_MAX_SAMPLES}
"""The largest payload of each kind a client may send."""


class ProtocolError(Exception):
    """A message no client of the protocol sends: the connection ends with its reason."""


@dataclass(frozen=True)
class Message:
    kind: int
    payload: bytes
    value: Any = None
    """The decoded payload: str (text, error), dict (metadata), int (control, rating),
    float32 samples (PCM audio); None for the rest."""


def decode(data: bytes) -> Message:
    """A client's message -> its kind and checked payload; `ProtocolError` if malformed."""
    if not isinstance(data, (bytes, bytearray)):
        raise ProtocolError("text frames are not part of the protocol (binary messages only)")
    if len(data) == 0:
        raise ProtocolError("empty message (no kind byte)")
    kind, payload = data[0], bytes(data[1:])
    if kind not in LIMITS:
        raise ProtocolError(f"unknown message kind 0x{kind:02x}")
    name = NAMES[kind]
    if len(payload) > LIMITS[kind]:
        raise ProtocolError(f"{name} message of {len(payload)} bytes (at most {LIMITS[kind]})")
    value: Any = None
    if kind in (TEXT, ERROR, COLORED_TEXT, METADATA):
        body = payload[1:] if kind == COLORED_TEXT else payload
        try:
            value = body.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(f"{name} message that is not UTF-8") from None
        if kind == METADATA:
            try:
                value = json.loads(value) if value.strip() else {}
            except ValueError:
                raise ProtocolError("metadata message that is not JSON") from None
    elif kind == CONTROL:
        if len(payload) != 1 or payload[0] > CONTROL_RESTART:
            raise ProtocolError(f"control message {payload.hex() or '(empty)'}: expected one "
                                f"byte 0..{CONTROL_RESTART}")
        value = payload[0]
    elif kind == RATING:
        value = payload[0] if payload else None
    elif kind == PCM:
        if len(payload) % 2:
            raise ProtocolError("PCM audio of an odd number of bytes (16-bit samples)")
        value = pcm_to_float(payload)
    elif kind == IMAGE and not payload:
        raise ProtocolError("image message without an image")
    return Message(kind, payload, value)


def pcm_to_float(payload: bytes) -> np.ndarray:
    """16-bit signed little-endian samples -> float32 in [-1, 1)."""
    return np.frombuffer(payload, dtype="<i2").astype(np.float32) / 32768.0


def float_to_pcm(samples: np.ndarray) -> bytes:
    """float32 samples -> 16-bit signed little-endian (clipped)."""
    a = np.clip(np.asarray(samples, dtype=np.float32), -1.0, 32767 / 32768)
    return np.round(a * 32768.0).astype("<i2").tobytes()


def _ogg_crc_table() -> list[int]:
    table = []
    for i in range(256):
        crc = i << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7 if crc & 0x80000000 else crc << 1) & 0xFFFFFFFF
        table.append(crc)
    return table


_OGG_CRC = _ogg_crc_table()


def ogg_crc(data: bytes) -> int:
    """Ogg's page checksum (CRC-32, polynomial 0x04C11DB7, no reflection)."""
    crc = 0
    for byte in data:
        crc = _OGG_CRC[((crc >> 24) ^ byte) & 0xFF] ^ ((crc << 8) & 0xFFFFFFFF)
    return crc


def repair_ogg_page(page: bytes) -> bytes:
    """A client (fujielab-moshi-client 0.1) writes each Opus packet as one Ogg page with a
    single lacing value capped at 255, so every packet of 255 bytes or more makes a page
    whose segment table undercounts it. Such a message, one page and nothing after its
    packet, is given its true segment table and checksum; anything else is left as it is."""
    if len(page) <= 28 + 255 or page[:4] != b"OggS" or page[26] != 1 or page[27] != 255:
        return page
    body = page[28:]
    lacing = [255] * (len(body) // 255) + [len(body) % 255]
    if len(lacing) > 255:
        return page
    head = bytearray(page[:26] + bytes([len(lacing), *lacing]))
    head[22:26] = b"\0\0\0\0"
    head[22:26] = ogg_crc(bytes(head) + body).to_bytes(4, "little")
    return bytes(head) + body


# -- what the server sends ------------------------------------------------------------------

def handshake() -> bytes:
    return bytes([HANDSHAKE])


def audio(ogg: bytes) -> bytes:
    return bytes([AUDIO]) + ogg


def pcm(samples: np.ndarray) -> bytes:
    return bytes([PCM]) + float_to_pcm(samples)


def text(piece: str) -> bytes:
    return bytes([TEXT]) + spoken(piece).encode("utf-8")


def gate_colour(gate: float | None) -> int:
    """A gate value -> MoshiVis' colour index 0..10 (0: general knowledge, 10: the image),
    as its servers compute it; no gate yet (before `xa_start`, or no image) is 0."""
    if gate is None or not math.isfinite(gate):
        return 0
    return round(min(max((gate - 0.005) / 0.016, 0.0), 1.0) * 10)


def colored_text(piece: str, gate: float | None) -> bytes:
    return bytes([COLORED_TEXT, gate_colour(gate)]) + spoken(piece).encode("utf-8")


def metadata(data: dict[str, Any]) -> bytes:
    return bytes([METADATA]) + json.dumps(data, separators=(",", ":")).encode("utf-8")


def error(message: str) -> bytes:
    return bytes([ERROR]) + message.encode("utf-8")[:MAX_SMALL_BYTES]


def ping(payload: bytes = b"") -> bytes:
    return bytes([PING]) + payload


def spoken(piece: str) -> str:
    """A SentencePiece piece as Kyutai's servers send it: "▁" becomes a space."""
    return piece.replace("▁", " ")


# -- what a client asks for, in the websocket's query ----------------------------------------

@dataclass(frozen=True)
class ClientOptions:
    """The query parameters of `/api/chat` this server reads (others are ignored)."""

    text_temperature: float | None = None
    text_topk: int | None = None
    audio_temperature: float | None = None
    audio_topk: int | None = None
    text_seed: int | None = None
    audio_seed: int | None = None
    xa_start: int | None = None
    pcm: bool = False
    """`audio=pcm`: the server's audio comes as 0x81 PCM instead of Ogg Opus."""
    image: str = "auto"
    """`image=first`: wait for the client's image (MoshiVis' order); `image=none`: send the
    handshake at once (Moshi's order); auto: wait briefly for an image."""
    colored: bool | None = None
    """`text=colored` / `text=plain`: 0x07 or 0x02 text (default: 0x07 after an image-first
    handshake, as MoshiVis' servers do, else 0x02)."""
    stats: bool = False
    """`stats=1`: a metadata message with the frame's cost about once a second."""
    ignored: tuple[str, ...] = field(default=())
    """Kyutai's parameters this server accepts but does not use (pad_mult, ...)."""


ACCEPTED_UNUSED = ("pad_mult", "repetition_penalty", "repetition_penalty_context",
                   "image_resolution", "center_crop", "text_temperature_gating_influence",
                   "worker_auth_id", "email", "token")
"""Kyutai's clients send these; the model here has no such settings (or they are the
server's: `token`)."""


def _number(query: dict[str, str], key: str, kind: type, lo: float, hi: float) -> Any:
    raw = query.get(key)
    if raw is None or raw == "":
        return None
    try:
        v = kind(float(raw)) if kind is int and "." in raw else kind(raw)
    except (ValueError, OverflowError):
        raise ProtocolError(f"query parameter {key}={raw[:40]!r} is not a number") from None
    if not (isinstance(v, int) or math.isfinite(v)) or not lo <= v <= hi:
        raise ProtocolError(f"query parameter {key}={raw[:40]!r} is out of range "
                            f"[{lo:g}, {hi:g}]")
    return v


def client_options(query: dict[str, str]) -> ClientOptions:
    """The websocket's query -> the client's settings; `ProtocolError` for a bad value."""
    def choice(key: str, allowed: tuple[str, ...], default: str) -> str:
        v = query.get(key, default) or default
        if v not in allowed:
            raise ProtocolError(f"query parameter {key}={v[:40]!r}: expected one of "
                                f"{', '.join(allowed)}")
        return v

    audio_kind = choice("audio", ("opus", "pcm"), "opus")
    text_kind = choice("text", ("auto", "colored", "plain"), "auto")
    return ClientOptions(
        text_temperature=_number(query, "text_temperature", float, 0.0, 100.0),
        text_topk=_number(query, "text_topk", int, 0, 1 << 20),
        audio_temperature=_number(query, "audio_temperature", float, 0.0, 100.0),
        audio_topk=_number(query, "audio_topk", int, 0, 1 << 20),
        text_seed=_number(query, "text_seed", int, 0, (1 << 62)),
        audio_seed=_number(query, "audio_seed", int, 0, (1 << 62)),
        xa_start=_number(query, "xa_start", int, 0, 1 << 20),
        pcm=audio_kind == "pcm",
        image=choice("image", ("auto", "first", "none"), "auto"),
        colored=None if text_kind == "auto" else text_kind == "colored",
        stats=query.get("stats", "0") not in ("0", "", "false", "no"),
        ignored=tuple(k for k in ACCEPTED_UNUSED if k in query))
