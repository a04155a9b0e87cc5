"""A latency-per-step plot (the paper's Figure 6) drawn with Pillow: no plotting library."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLOURS = {"moshi": (31, 119, 180), "moshivis": (214, 39, 40), "frame": (44, 160, 44),
           "frame-image": (148, 103, 189)}
FALLBACK = [(140, 86, 75), (227, 119, 194), (127, 127, 127)]
W, H = 1200, 600
# The legend sits in the top margin and the budget's label in the right one: no text is
# ever drawn over the curves.
LEFT, RIGHT, TOP, BOTTOM = 80, 150, 76, 60


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _nice_step(span: float) -> float:
    raw = span / 6
    mag = 10 ** np.floor(np.log10(raw))
    return float(min((m * mag for m in (1, 2, 5, 10) if m * mag >= raw), default=raw))


def plot_latency(report: dict[str, Any], path: Path) -> None:
    """Per-step latency of each scenario across the conversation, with the real-time budget
    (a frame's duration, from the report)."""
    budget_ms = float(report.get("budget_ms", 80.0))
    series = {name: np.asarray(s["steps_ms"]) for name, s in report["scenarios"].items()}
    n = max(len(v) for v in series.values())
    top = max([budget_ms * 1.15] + [float(np.percentile(v, 99.9)) * 1.1 for v in series.values()])
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    font, small = _font(16), _font(13)
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM

    def xy(i: float, ms: float) -> tuple[float, float]:
        return LEFT + pw * i / max(n - 1, 1), TOP + ph * (1 - min(ms, top) / top)

    step = _nice_step(top)
    for k in range(int(top / step) + 1):
        y = xy(0, k * step)[1]
        d.line([(LEFT, y), (W - RIGHT, y)], fill=(230, 230, 230))
        d.text((LEFT - 8, y), f"{k * step:g}", fill="black", font=small, anchor="rm")
    xstep = _nice_step(n)
    for k in range(int(n / xstep) + 1):
        x = xy(k * xstep, 0)[0]
        d.text((x, TOP + ph + 8), f"{k * xstep:g}", fill="black", font=small, anchor="mt")
    d.rectangle([LEFT, TOP, W - RIGHT, TOP + ph], outline="black")

    for idx, (name, ms) in enumerate(series.items()):
        colour = COLOURS.get(name, FALLBACK[idx % len(FALLBACK)])
        d.line([xy(i, v) for i, v in enumerate(ms)], fill=colour, width=1)
    y = xy(0, budget_ms)[1]
    for x in range(LEFT, W - RIGHT, 12):
        d.line([(x, y), (min(x + 6, W - RIGHT), y)], fill=(0, 0, 0), width=2)
    d.text((W - RIGHT + 8, y), f"budget {budget_ms:g} ms", fill="black", font=small,
           anchor="lm")

    # The legend: two columns in the top margin.
    for idx, (name, s) in enumerate(report["scenarios"].items()):
        colour = COLOURS.get(name, FALLBACK[idx % len(FALLBACK)])
        lx = LEFT + (idx % 2) * 420
        ly = 34 + 18 * (idx // 2)
        d.rectangle([lx, ly + 3, lx + 14, ly + 13], fill=colour)
        d.text((lx + 20, ly), f"{name}: p50 {s['p50']:.1f} ms, p99 {s['p99']:.1f} ms",
               fill="black", font=small)
    m = report["machine"]
    d.text((W / 2, 8), f"Latency per step, {report['config']} {report['quant']} on "
           f"{m['device']} (mlx {m['mlx']})", fill="black", font=font, anchor="mt")
    d.text((W / 2, H - 22), "step (80 ms of audio each)", fill="black", font=font, anchor="mm")
    d.text((18, TOP + ph / 2), "ms", fill="black", font=font, anchor="mm")
    img.save(path)
