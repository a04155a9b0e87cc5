"""Shared pieces of the server tests: the real entry point (`moshivis-mlx --serve`) on the
tiny demo bundle in a process of its own, its memory, and a small websocket client."""

from __future__ import annotations

import asyncio
import re
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
from app_support import APP, REPO, app_env, demo_bundle, stop_process_group

FRAME = 1920
RATE = 24000


class ServerProcess:
    """`moshivis-mlx --serve --port 0` in a process group of its own; `url` once listening."""

    def __init__(self, *args: str, bundle: Path | None = None, env: dict | None = None):
        self.args = ["--serve", "--weights", str(bundle or demo_bundle()), "--port", "0",
                     "--seed", "1", *args]
        self.env = env or app_env()
        self.lines: list[str] = []
        self.process: subprocess.Popen | None = None
        self.port: int | None = None
        self.scheme = "http"
        self.token: str | None = None

    def start(self, timeout: float = 120) -> ServerProcess:
        self.process = subprocess.Popen([*APP, *self.args], cwd=REPO, env=self.env,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, start_new_session=True)
        ready = threading.Event()

        def read() -> None:
            for line in self.process.stdout:
                self.lines.append(line.rstrip("\n"))
                m = re.search(r"serving on (https?)://[^ ]*?:(\d+)/(\?token=(\S+))?", line)
                if m and self.port is None:
                    self.scheme, self.port, self.token = m[1], int(m[2]), m[4]
                if "Ctrl-C stops the server" in line:  # the last line it prints
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not ready.wait(0.2):
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the server did not start:\n" + "\n".join(self.lines))
        if self.port is None:
            raise RuntimeError("the server stopped:\n" + "\n".join(self.lines))
        return self

    @property
    def base(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def ws_url(self, **query: str) -> str:
        ws = "wss" if self.scheme == "https" else "ws"
        q = "&".join(f"{k}={v}" for k, v in query.items())
        return f"{ws}://127.0.0.1:{self.port}/api/chat" + (f"?{q}" if q else "")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def rss_mb(self) -> float:
        """The server's resident memory (Linux /proc; macOS: ps)."""
        status = Path(f"/proc/{self.process.pid}/status")
        if status.exists():
            m = re.search(r"VmRSS:\s+(\d+) kB", status.read_text())
            return int(m[1]) / 1024
        out = subprocess.run(["ps", "-o", "rss=", "-p", str(self.process.pid)],
                             capture_output=True, text=True).stdout
        return int(out.strip()) / 1024

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            stop_process_group(self.process)


def speech_frames(wav: Path) -> np.ndarray:
    """A 24 kHz WAV as float32 samples."""
    from moshivis_mlx.wav import read_wav

    pcm, rate = read_wav(wav)
    assert rate == RATE
    return pcm.reshape(len(pcm), -1).mean(axis=1).astype(np.float32)


async def converse(url: str, speech: np.ndarray, image: bytes | None = None,
                   pcm: bool = False, seconds_after: float = 2.0, ssl: object = True,
                   headers: dict | None = None) -> dict:
    """A client of our own: connects, (sends `image` first: MoshiVis' order), waits for the
    handshake, streams `speech` in real time as 20 ms Ogg Opus packets (or 80 ms PCM), and
    collects what comes back. Returns the kinds seen in order, the decoded audio, the text."""
    import aiohttp
    import sphn

    from moshivis_mlx.serve import protocol

    out: dict = {"kinds": [], "audio": [], "text": [], "colours": [], "metadata": [],
                 "errors": []}
    reader = sphn.OpusStreamReader(RATE)
    async with aiohttp.ClientSession() as session, session.ws_connect(
            url, ssl=ssl, headers=headers or {}, max_msg_size=0) as ws:
        if image is not None:
            await ws.send_bytes(bytes([protocol.IMAGE]) + image)
        first = await ws.receive(timeout=30)
        out["kinds"].append(first.data[0] if first.type == aiohttp.WSMsgType.BINARY else None)
        if out["kinds"][0] != protocol.HANDSHAKE:
            out["errors"].append(first.data)
            return out

        async def receive() -> None:
            async for m in ws:
                if m.type != aiohttp.WSMsgType.BINARY:
                    break
                kind, payload = m.data[0], m.data[1:]
                out["kinds"].append(kind)
                if kind == protocol.AUDIO:
                    out["audio"].append(reader.append_bytes(payload))
                elif kind == protocol.PCM:
                    out["audio"].append(protocol.pcm_to_float(payload))
                elif kind == protocol.TEXT:
                    out["text"].append(payload.decode())
                elif kind == protocol.COLORED_TEXT:
                    out["colours"].append(payload[0])
                    out["text"].append(payload[1:].decode())
                elif kind == protocol.METADATA:
                    import json

                    out["metadata"].append(json.loads(payload))
                elif kind == protocol.ERROR:
                    out["errors"].append(payload.decode())

        task = asyncio.create_task(receive())
        writer = sphn.OpusStreamWriter(RATE)
        step = FRAME if pcm else 480
        silence = np.zeros(int(seconds_after * RATE), dtype=np.float32)
        audio = np.concatenate([speech, silence])
        t0 = time.monotonic()
        for i in range(0, len(audio) - step + 1, step):
            chunk = audio[i:i + step]
            if pcm:
                await ws.send_bytes(protocol.pcm(chunk))
            else:
                ogg = writer.append_pcm(chunk)
                if ogg:
                    await ws.send_bytes(bytes([protocol.AUDIO]) + ogg)
            ahead = t0 + (i + step) / RATE - time.monotonic()
            if ahead > 0:
                await asyncio.sleep(ahead)
        await asyncio.sleep(1.0)
        await ws.close()
        await asyncio.wait_for(task, 10)
    out["audio"] = np.concatenate(out["audio"]) if out["audio"] else np.zeros(0, np.float32)
    return out


def run(coro):
    return asyncio.run(coro)

