"""Makes the demo's sample picture and spoken question (run once; the results are committed).

    python scripts/make_demo_assets.py      # needs pillow, espeak-ng and sox

sample.jpg:   a small drawn scene (house, tree, sun, hills), 160x120 JPEG
question.wav: "What do you see in this picture?" spoken by espeak-ng, 24 kHz mono 16-bit
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

ASSETS = Path(__file__).resolve().parent.parent / "moshivis_mlx" / "app" / "assets"
QUESTION = "What do you see in this picture?"


def make_image(path: Path) -> None:
    w, h = 160, 120
    img = Image.new("RGB", (w, h))
    d = ImageDraw.Draw(img)
    for y in range(h):  # sky: deep blue at the top to pale near the horizon
        f = y / h
        d.line([(0, y), (w, y)], fill=(int(70 + 120 * f), int(130 + 90 * f), int(220 + 30 * f)))
    d.ellipse([118, 10, 146, 38], fill=(255, 214, 60))  # sun
    d.ellipse([-60, 70, 120, 190], fill=(70, 160, 70))  # hills
    d.ellipse([60, 78, 240, 200], fill=(50, 135, 60))
    d.rectangle([52, 62, 96, 96], fill=(240, 236, 225))  # house
    d.polygon([(46, 64), (74, 40), (102, 64)], fill=(170, 40, 40))  # roof
    d.rectangle([68, 76, 80, 96], fill=(110, 70, 40))  # door
    d.rectangle([56, 68, 64, 76], fill=(120, 180, 230))  # windows
    d.rectangle([84, 68, 92, 76], fill=(120, 180, 230))
    d.rectangle([20, 70, 25, 92], fill=(100, 70, 40))  # tree
    d.ellipse([8, 48, 38, 76], fill=(40, 120, 50))
    d.polygon([(74, 96), (68, 120), (86, 120), (78, 96)], fill=(200, 180, 130))  # path
    img.save(path, quality=88, optimize=True)


def make_speech(path: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.wav"
        subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(raw), QUESTION],
                       check=True)
        # 24 kHz mono 16-bit, 0.3 s of silence after the question so the model can answer.
        subprocess.run(["sox", str(raw), "-r", "24000", "-c", "1", "-b", "16", str(path),
                        "norm", "-3", "pad", "0.1", "0.4"], check=True)


if __name__ == "__main__":
    ASSETS.mkdir(parents=True, exist_ok=True)
    make_image(ASSETS / "sample.jpg")
    make_speech(ASSETS / "question.wav")
    for f in sorted(ASSETS.iterdir()):
        print(f"{f.relative_to(ASSETS.parent.parent.parent)}: {f.stat().st_size} bytes")
