"""WAV files: reading whatever people have, writing what we record.

Python's `wave` module reads integer PCM only; recordings come as 8/16/24/32-bit PCM,
32/64-bit float and WAVE_FORMAT_EXTENSIBLE wrappers of those, so the RIFF chunks are
parsed here. Every unusable file becomes an `AudioFileError` with a one-line message.

`WavWriter` writes 16-bit PCM incrementally and rewrites the header's sizes as it goes,
so a recording interrupted at any point is still a valid file holding what was written.
Past 4 GiB (about 12 hours of stereo at 24 kHz) a RIFF header cannot count the bytes any
more: the header becomes RF64's (EBU Tech 3306: the same file with 64-bit sizes in a
`ds64` chunk that replaces the `JUNK` chunk reserved for it), which sox, ffmpeg and
this reader read.

What a header claims is never trusted for memory: the sample rate must be one that
recorders make (1 kHz to 768 kHz), and a read takes a bounded number of bytes whatever
the channel count.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .errors import AudioFileError

PCM, IEEE_FLOAT, EXTENSIBLE = 0x0001, 0x0003, 0xFFFE
MIN_RATE, MAX_RATE = 1000, 768_000
"""Sample rates accepted (768 kHz is the highest any audio interface records)."""
MAX_CHUNKS = 4096
"""RIFF chunks looked at before giving up: a real WAV has a handful."""
MAX_FMT_BYTES = 1024
READ_BYTES = 4 << 20
"""The most bytes one `read` takes from the file (a block of frames, whatever their width)."""
FORMAT_NAMES = {0x0002: "MS ADPCM", 0x0006: "A-law", 0x0007: "mu-law", 0x0011: "IMA ADPCM",
                0x0055: "MP3"}


def _chunks(f: BinaryIO, size: int, name: str):
    """(chunk id, payload offset, payload size) of each RIFF chunk."""
    pos = 12
    for _ in range(MAX_CHUNKS):
        if pos + 8 > size:
            return
        f.seek(pos)
        head = f.read(8)
        if len(head) < 8:
            return
        cid, csize = struct.unpack("<4sI", head)
        yield cid, pos + 8, csize
        pos += 8 + csize + (csize & 1)  # chunks are word-aligned
    raise AudioFileError(f"{name}: broken WAV file (more than {MAX_CHUNKS} chunks)")


def _parse_fmt(data: bytes, name: str) -> tuple[int, int, int, bool]:
    if len(data) < 16:
        raise AudioFileError(f"{name}: broken WAV header (fmt chunk of {len(data)} bytes)")
    tag, channels, rate, _, block_align, bits = struct.unpack("<HHIIHH", data[:16])
    if tag == EXTENSIBLE:
        if len(data) < 40:
            raise AudioFileError(f"{name}: broken WAV header (short extensible fmt chunk)")
        # The sub-format GUID starts with the plain format tag; the container width
        # (`bits` above) decides the sample layout.
        tag = struct.unpack("<H", data[24:26])[0]
    if tag not in (PCM, IEEE_FLOAT):
        what = FORMAT_NAMES.get(tag, f"format 0x{tag:04x}")
        raise AudioFileError(f"{name}: compressed WAV ({what}) is not supported; convert it to "
                             f"PCM first, e.g. sox {name} -e signed -b 16 out.wav")
    is_float = tag == IEEE_FLOAT
    if channels < 1 or rate < 1:
        raise AudioFileError(f"{name}: broken WAV header ({channels} channels at {rate} Hz)")
    if not MIN_RATE <= rate <= MAX_RATE:
        raise AudioFileError(f"{name}: a sample rate of {rate} Hz is not audio (the reader takes "
                             f"{MIN_RATE} Hz to {MAX_RATE // 1000} kHz); resample it first, e.g. "
                             f"sox {name} -r 24000 out.wav")
    if (is_float and bits not in (32, 64)) or (not is_float and bits not in (8, 16, 24, 32)):
        kind = "float" if is_float else "PCM"
        raise AudioFileError(f"{name}: {bits}-bit {kind} WAV is not supported "
                             f"(PCM 8/16/24/32-bit and float 32/64-bit are)")
    if block_align != channels * bits // 8:
        raise AudioFileError(f"{name}: broken WAV header (block align {block_align} for "
                             f"{channels} x {bits}-bit)")
    return rate, channels, bits, is_float


def _decode(raw: bytes, bits: int, is_float: bool, channels: int) -> np.ndarray:
    """Little-endian samples -> float32 [frames, channels] in [-1, 1]."""
    if is_float:
        a = np.frombuffer(raw, dtype="<f4" if bits == 32 else "<f8").astype(np.float32)
    elif bits == 8:
        a = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif bits == 16:
        a = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    elif bits == 24:
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        v = np.where(v >= 1 << 23, v - (1 << 24), v)
        a = v.astype(np.float32) / float(1 << 23)
    else:
        a = (np.frombuffer(raw, dtype="<i4").astype(np.float64) / 2147483648.0).astype(np.float32)
    return a.reshape(-1, channels)


class WavReader:
    """Reads a WAV file block by block (an hour of audio never has to fit in memory).

    with WavReader(path) as r:      # r.sample_rate, r.channels, r.frames
        block = r.read(65536)        # float32 [n, channels], n = 0 at the end
    """

    def __init__(self, path: str | Path):
        path = Path(path)
        self.path = path
        name = str(path)
        if not path.exists():
            raise AudioFileError(f"{name}: no such file")
        if path.is_dir():
            raise AudioFileError(f"{name}: is a directory, expected a WAV file")
        try:
            self._f: BinaryIO = open(path, "rb")
        except PermissionError:
            raise AudioFileError(f"{name}: permission denied") from None
        try:
            self._parse(name, path.stat().st_size)
        except BaseException:
            self._f.close()
            raise

    def _parse(self, name: str, size: int) -> None:
        f = self._f
        head = f.read(12)
        if (len(head) < 12 or head[:4] not in (b"RIFF", b"RF64", b"RIFX")
                or head[8:12] != b"WAVE"):
            raise AudioFileError(f"{name}: not a WAV file (convert it first, e.g. "
                                 f"sox {name} out.wav, or ffmpeg -i {name} out.wav)")
        if head[:4] == b"RIFX":
            raise AudioFileError(f"{name}: big-endian WAV (RIFX) is not supported")
        fmt = None
        data_at = None
        data64 = None
        for cid, offset, csize in _chunks(f, size, name):
            if cid == b"ds64" and head[:4] == b"RF64" and csize >= 24:
                f.seek(offset)
                data64 = struct.unpack("<QQQ", f.read(24))[1]
            elif cid == b"fmt ":
                f.seek(offset)
                fmt = _parse_fmt(f.read(min(csize, MAX_FMT_BYTES)), name)
            elif cid == b"data":
                # RF64 keeps the size in ds64; streamed writers leave 0 or 0xFFFFFFFF: to the end.
                available = size - offset
                if csize == 0xFFFFFFFF and data64 is not None:
                    csize = data64
                data_at = (offset, available if csize in (0, 0xFFFFFFFF) else min(csize, available))
                if fmt is not None:
                    break
        if fmt is None:
            raise AudioFileError(f"{name}: broken WAV file (no fmt chunk)")
        if data_at is None:
            raise AudioFileError(f"{name}: broken WAV file (no audio data chunk)")
        self.sample_rate, self.channels, self.bits, self.is_float = fmt
        self._block = self.channels * self.bits // 8
        offset, nbytes = data_at
        self.frames = nbytes // self._block  # a truncated last frame is dropped
        if self.frames == 0:
            raise AudioFileError(f"{name}: the WAV file holds no audio")
        self._remaining = self.frames
        f.seek(offset)

    @property
    def max_read(self) -> int:
        """The most frames one `read` returns (a bounded number of bytes)."""
        return max(1, READ_BYTES // self._block)

    def read(self, frames: int) -> np.ndarray:
        """Up to `frames` frames (at most `max_read`) as float32 [n, channels] in [-1, 1]
        (n = 0: the end)."""
        n = min(frames, self._remaining, self.max_read)
        raw = self._f.read(n * self._block)
        n = len(raw) // self._block
        self._remaining -= n
        a = _decode(raw[:n * self._block], self.bits, self.is_float, self.channels)
        if self.is_float:
            a = np.nan_to_num(a, nan=0.0, posinf=1.0, neginf=-1.0)
        return a

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> WavReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """A whole WAV file -> (float32 samples [frames, channels], sample rate)."""
    with WavReader(path) as r:
        blocks = []
        while len(block := r.read(r.max_read)):
            blocks.append(block)
        audio = np.concatenate(blocks) if blocks else np.zeros((0, r.channels), np.float32)
        return audio, r.sample_rate


def to_int16(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, -1.0, 1.0) * 32767.0).round().astype("<i2")


class WavWriter:
    """16-bit PCM WAV written as it comes: `write` appends frames, the header's sizes are
    rewritten every `sync_every` frames and at `close`, so the file is always playable.

    The header reserves a JUNK chunk for RF64's ds64: past `MAX_RIFF` bytes the file turns
    into an RF64 file in place (see the module docstring)."""

    MAX_RIFF = 0xFFFFFFFF
    """The largest size a RIFF header can hold."""
    HEADER = 80

    def __init__(self, path: str | Path, sample_rate: int, channels: int = 1,
                 sync_every: int = 24000):
        self.path = Path(path)
        self.sample_rate = sample_rate
        self.channels = channels
        self.frames = 0
        self._since_sync = 0
        self._sync_every = sync_every
        self._f: BinaryIO | None = open(self.path, "wb")
        self._write_header()

    @property
    def rf64(self) -> bool:
        return self.HEADER - 8 + self.frames * self.channels * 2 > self.MAX_RIFF

    def _write_header(self) -> None:
        assert self._f is not None
        data_bytes = self.frames * self.channels * 2
        block = self.channels * 2
        riff = self.HEADER - 8 + data_bytes
        f = self._f
        f.seek(0)
        if self.rf64:
            f.write(struct.pack("<4sI4s", b"RF64", 0xFFFFFFFF, b"WAVE"))
            f.write(struct.pack("<4sIQQQI", b"ds64", 28, riff, data_bytes, self.frames, 0))
        else:
            f.write(struct.pack("<4sI4s", b"RIFF", riff, b"WAVE"))
            f.write(struct.pack("<4sI28x", b"JUNK", 28))
        f.write(struct.pack("<4sIHHIIHH", b"fmt ", 16, PCM, self.channels,
                            self.sample_rate, self.sample_rate * block, block, 16))
        f.write(struct.pack("<4sI", b"data", 0xFFFFFFFF if self.rf64 else data_bytes))
        f.seek(0, 2)

    def write(self, samples: np.ndarray) -> None:
        """float samples in [-1, 1], [frames] (mono) or [frames, channels]."""
        if self._f is None:
            raise ValueError(f"{self.path}: already closed")
        x = np.asarray(samples, dtype=np.float32)
        if x.ndim == 1:
            x = x[:, None]
        if x.shape[1] != self.channels:
            raise ValueError(f"expected {self.channels} channels, got {x.shape[1]}")
        self._f.write(to_int16(x).tobytes())
        self.frames += x.shape[0]
        self._since_sync += x.shape[0]
        if self._since_sync >= self._sync_every:
            self.sync()

    def sync(self) -> None:
        """Make the file on disk complete up to now."""
        if self._f is not None:
            self._write_header()
            self._f.flush()
            self._since_sync = 0

    def close(self) -> None:
        if self._f is not None:
            try:
                self._write_header()
            finally:
                self._f.close()
                self._f = None

    def __enter__(self) -> WavWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_wav(path: str | Path, samples: np.ndarray, sample_rate: int) -> None:
    """Writes a whole signal ([frames] or [frames, channels]) as 16-bit PCM."""
    x = np.asarray(samples)
    with WavWriter(path, sample_rate, 1 if x.ndim == 1 else x.shape[1]) as w:
        w.write(x)
