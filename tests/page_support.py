"""Running the web page's JavaScript modules (moshivis_mlx/serve/static/) under node, and
an Ogg reader of our own in Python to check what they write against."""

from __future__ import annotations

import json
import struct
import subprocess
from pathlib import Path
from typing import Any

STATIC = Path(__file__).resolve().parent.parent / "moshivis_mlx" / "serve" / "static"


def run_js(body: str, data: Any = None, timeout: float = 60) -> Any:
    """Runs `body` as an ES module next to the page's modules (so `./ogg.js` imports
    them), with `input` bound to `data`; the module sets `output`, which comes back.
    Bytes travel as lists of numbers."""
    script = ("const input = JSON.parse(await new Promise((ok) => { let s = '';"
              " process.stdin.on('data', (d) => s += d); process.stdin.on('end', () => ok(s)); }));"
              "\nlet output = null;\n" + body
              + "\nprocess.stdout.write(JSON.stringify(output));\n")
    done = subprocess.run(["node", "--input-type=module", "-e", script], cwd=STATIC,
                          input=json.dumps(data), capture_output=True, text=True,
                          timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(f"node failed:\n{done.stderr}")
    return json.loads(done.stdout)


def ogg_crc(data: bytes) -> int:
    """Ogg's CRC-32 (polynomial 0x04c11db7, not reflected, initial 0, no final xor),
    bit by bit: slow and obviously the definition."""
    crc = 0
    for byte in data:
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) if crc & 0x80000000 else crc << 1
            crc &= 0xFFFFFFFF
    return crc


def ogg_pages(data: bytes) -> list[dict]:
    """Every page of an Ogg stream, checked: capture pattern, version, checksum."""
    pages, at = [], 0
    while at < len(data):
        assert data[at:at + 4] == b"OggS", f"no page at byte {at}"
        header = struct.unpack_from("<BBqIIIB", data, at + 4)
        version, flags, granule, serial, sequence, crc, n = header
        assert version == 0
        lacing = list(data[at + 27:at + 27 + n])
        size = 27 + n + sum(lacing)
        raw = bytearray(data[at:at + size])
        raw[22:26] = b"\0\0\0\0"
        assert ogg_crc(bytes(raw)) == crc, f"bad checksum on page {sequence}"
        pages.append({"flags": flags, "granule": granule, "serial": serial, "sequence": sequence,
                      "lacing": lacing, "body": data[at + 27 + n:at + size]})
        at += size
    return pages
