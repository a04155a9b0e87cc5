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


# -- the page in headless Chromium, driven over the DevTools protocol ----------------------

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
    "--autoplay-policy=no-user-gesture-required", "--window-size=1280,800",
    "--remote-debugging-port=0",
]


class Browser:
    """Headless Chromium with a fake microphone playing `wav` (and a fake camera), its
    sound going where `env` says (PULSE_SERVER, PULSE_SINK), and one page driven over the
    DevTools protocol:

        async with Browser(tmp, wav) as b:
            await b.open(url)
            await b.evaluate("1 + 1")
    """

    def __init__(self, tmp: Path, wav: Path, env: dict[str, str] | None = None,
                 chromium: str = "chromium"):
        self.tmp, self.wav, self.env, self.chromium = tmp, wav, env, chromium
        self.errors: list[str] = []
        self._id = 0

    async def __aenter__(self) -> Browser:
        import asyncio

        import aiohttp

        profile = self.tmp / "profile"
        profile.mkdir()
        self.log = open(self.tmp / "chromium.log", "w")
        self.proc = subprocess.Popen(
            [self.chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
             f"--use-file-for-fake-audio-capture={self.wav}", "about:blank"],
            stdout=self.log, stderr=subprocess.STDOUT, env=self.env)
        port_file = profile / "DevToolsActivePort"  # Chromium writes it once listening
        for _ in range(300):
            if port_file.exists() and port_file.read_text().strip():
                break
            if self.proc.poll() is not None:
                raise AssertionError(f"chromium exited: {(self.tmp / 'chromium.log').read_text()}")
            await asyncio.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        self.http = aiohttp.ClientSession()
        async with self.http.get(f"http://127.0.0.1:{port}/json/list") as r:
            target = next(t for t in await r.json() if t["type"] == "page")
        self.ws = await self.http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=1 << 27)
        for domain in ("Runtime", "Page", "DOM"):
            await self.call(f"{domain}.enable")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.ws.close()
        await self.http.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    async def call(self, method: str, **params: Any) -> dict:
        self._id += 1
        await self.ws.send_json({"id": self._id, "method": method, "params": params})
        while True:
            msg = await self.ws.receive_json(timeout=60)
            if msg.get("method") == "Runtime.exceptionThrown":
                d = msg["params"]["exceptionDetails"]
                self.errors.append(d.get("exception", {}).get("description") or d["text"])
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise AssertionError(f"{method}: {msg['error']}")
                return msg["result"]

    async def evaluate(self, expression: str, gesture: bool = False) -> Any:
        """The value of a JavaScript expression in the page (awaited; `gesture`: as if
        the user had clicked, which audio and the microphone need)."""
        r = await self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                            awaitPromise=True, userGesture=gesture)
        if "exceptionDetails" in r:
            raise AssertionError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    async def open(self, url: str) -> None:
        import asyncio

        await self.call("Page.navigate", url=url)
        for _ in range(100):
            if await self.evaluate("typeof window.moshivis === 'object'"):
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"the page at {url} did not start: {self.errors}")

    async def choose_file(self, selector: str, path: Path) -> None:
        """Picks `path` in a file input, as the user would in the file dialog."""
        doc = await self.call("DOM.getDocument")
        node = await self.call("DOM.querySelector", nodeId=doc["root"]["nodeId"],
                               selector=selector)
        await self.call("DOM.setFileInputFiles", files=[str(path)], nodeId=node["nodeId"])

    async def screenshot(self, path: Path, width: int | None = None,
                         height: int | None = None, scale: float = 1) -> Path:
        import asyncio
        import base64

        if width:
            await self.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                            deviceScaleFactor=scale, mobile=width < 600)
            await asyncio.sleep(0.5)  # the new layout painted
        shot = await self.call("Page.captureScreenshot", format="png")
        if width:
            await self.call("Emulation.clearDeviceMetricsOverride")
        path.write_bytes(base64.b64decode(shot["data"]))
        return path
