"""What the server's transport adds to each 80 ms frame, on this machine (docs/SERVE.md).

    Opus encode    one frame of the model's voice -> Ogg Opus (sphn, as the server does)
    Opus decode    one frame's Ogg Opus from a client -> samples
    PCM encode / decode   the 0x81 variant: float32 <-> 16-bit little-endian
    socket         one frame's message through a websocket on the loopback and back
                   (aiohttp at both ends, as the server and Kyutai's Python client); half
                   the round trip is what one direction adds

With --weights BUNDLE it also measures what a second conversation would cost if the two
were stepped together: the language model's step (`Generator.step`) with batch 1 and with
batch 2 on that bundle (the server itself serves one conversation at a time).

Usage: python scripts/bench_transport.py [--frames 1000] [--weights BUNDLE] [--json out.json]
Reports medians and 90th percentiles in milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import time

import numpy as np

FRAME, RATE = 1920, 24000


def speechlike(n: int, seed: int = 0) -> np.ndarray:
    """Noise shaped like speech (bursts, a few harmonics): what Opus has to code."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / RATE
    voice = sum(np.sin(2 * np.pi * f * t + rng.random() * 6) / k
                for k, f in enumerate((140, 280, 420, 900), 1))
    envelope = (np.sin(2 * np.pi * 2.5 * t) > -0.3).astype(np.float32)
    return (0.2 * voice * envelope + 0.01 * rng.standard_normal(n)).astype(np.float32)


def stats(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {"median_ms": round(float(np.median(a)), 4),
            "p90_ms": round(float(np.percentile(a, 90)), 4)}


def codec(frames: int) -> dict[str, dict[str, float]]:
    import sphn

    from moshivis_mlx.serve import protocol

    audio = speechlike(frames * FRAME)
    writer, reader = sphn.OpusStreamWriter(RATE), sphn.OpusStreamReader(RATE)
    enc, dec, pcm_enc, pcm_dec, sizes = [], [], [], [], []
    for i in range(frames):
        frame = audio[i * FRAME:(i + 1) * FRAME]
        t0 = time.perf_counter()
        ogg = writer.append_pcm(frame)
        t1 = time.perf_counter()
        reader.append_bytes(ogg)
        t2 = time.perf_counter()
        raw = protocol.pcm(frame)
        t3 = time.perf_counter()
        protocol.decode(raw)
        t4 = time.perf_counter()
        enc.append(1e3 * (t1 - t0))
        dec.append(1e3 * (t2 - t1))
        pcm_enc.append(1e3 * (t3 - t2))
        pcm_dec.append(1e3 * (t4 - t3))
        sizes.append(len(ogg))
    return {"opus_encode": stats(enc[10:]), "opus_decode": stats(dec[10:]),
            "pcm_encode": stats(pcm_enc[10:]), "pcm_decode": stats(pcm_dec[10:]),
            "opus_bytes_per_frame": {"median": float(np.median(sizes[10:]))}}


async def socket_round_trips(frames: int, size: int) -> list[float]:
    from aiohttp import ClientSession, WSMsgType, web

    async def echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for m in ws:
            if m.type == WSMsgType.BINARY:
                await ws.send_bytes(m.data)
        return ws

    app = web.Application()
    app.router.add_get("/", echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    message = b"\x01" + bytes(size)
    trips = []
    async with ClientSession() as s, s.ws_connect(f"ws://127.0.0.1:{port}/") as ws:
        for _ in range(frames):
            t0 = time.perf_counter()
            await ws.send_bytes(message)
            await ws.receive()
            trips.append(1e3 * (time.perf_counter() - t0))
            await asyncio.sleep(0.002)
    await runner.cleanup()
    return trips[10:]


def batched_steps(weights: str, steps: int) -> dict[str, dict[str, float]]:
    """The model's step alone, batch 1 and batch 2 (silence in, no image)."""
    from moshivis_mlx import load

    model = load(weights, vision=False, codec=False, tokenizer=False)
    out = {}
    for b in (1, 2):
        gen = model.generator(seed=0, batch_size=b)
        codes = np.zeros((b, gen.num_user_codes), dtype=np.int32)
        gen.warm_up()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            gen.step(codes)
            times.append(1e3 * (time.perf_counter() - t0))
        out[f"model_step_batch{b}"] = stats(times[10:])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=1000)
    p.add_argument("--weights", help="a bundle: also time the model's step, batch 1 and 2")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    result: dict = {"machine": f"{platform.system()} {platform.machine()}",
                    "python": platform.python_version(), "frames": args.frames}
    result.update(codec(args.frames))
    opus_size = int(result["opus_bytes_per_frame"]["median"])
    for name, size in (("socket_opus_one_way", opus_size), ("socket_pcm_one_way", 2 * FRAME)):
        trips = asyncio.run(socket_round_trips(args.frames, size))
        result[name] = stats([t / 2 for t in trips])
    if args.weights:
        result["weights"] = args.weights
        result.update(batched_steps(args.weights, min(args.frames, 300)))
    for key, value in result.items():
        print(f"{key:22} {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
