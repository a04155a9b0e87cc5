"""Long-run check: an hour of audio through file mode, resident memory sampled throughout.

    python scripts/longrun.py                  # 45,000 steps = 1 hour of audio (make longrun)
    python scripts/longrun.py --steps 3000     # a quicker look

The tiny random-weight demo model answers an hour-long input (the sample question, over
and over) about the sample image, exactly as `moshivis-mlx --input-wav` does, in a child
process whose RSS is read every few seconds. The report compares the RSS once the run has
settled (after 10% of the steps) with the RSS at the end: a conversation must not grow.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from moshivis_mlx.app.demo import SAMPLE_IMAGE, SAMPLE_SPEECH, demo_bundle  # noqa: E402
from moshivis_mlx.wav import WavWriter, read_wav  # noqa: E402
from moshivis_mlx.stream import RELEASED  # noqa: E402

SAMPLE_RATE, FRAME_SIZE = RELEASED.sample_rate, RELEASED.frame_size


def rss_mb(pid: int) -> float | None:
    r = subprocess.run(["ps", "-o", "rss=", "-p", str(pid)], capture_output=True, text=True)
    return int(r.stdout.strip()) / 1024 if r.stdout.strip() else None


def make_input(path: Path, steps: int) -> None:
    """`steps` frames of the sample question repeated with 2 s pauses, written in blocks."""
    speech, _ = read_wav(SAMPLE_SPEECH)
    cycle = np.concatenate([speech[:, 0], np.zeros(2 * SAMPLE_RATE, dtype=np.float32)])
    total = steps * FRAME_SIZE
    with WavWriter(path, SAMPLE_RATE, 1) as w:
        done = 0
        while done < total:
            n = min(len(cycle), total - done)
            w.write(cycle[:n])
            done += n


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=45_000, help="80 ms steps (default: 1 hour)")
    p.add_argument("--every", type=float, default=5.0, help="seconds between RSS samples")
    p.add_argument("--json", type=Path, default=REPO / "out" / "longrun.json")
    p.add_argument("--max-growth-mb", type=float, default=32.0,
                   help="fail when RSS grows more than this after settling")
    args = p.parse_args()

    bundle, _ = demo_bundle()
    with tempfile.TemporaryDirectory(prefix="moshivis-longrun-") as tmp:
        tmp = Path(tmp)
        inp = tmp / "input.wav"
        print(f"writing {args.steps} frames ({args.steps * 0.08 / 60:.1f} min) of input ...",
              flush=True)
        make_input(inp, args.steps)
        cmd = [sys.executable, "-m", "moshivis_mlx.cli.app", "--weights", str(bundle),
               "--image", str(SAMPLE_IMAGE), "--input-wav", str(inp),
               "--output-wav", str(tmp / "output.wav"), "--transcript", str(tmp / "t.json"),
               "--seed", "0"]
        t0 = time.monotonic()
        child = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True)
        samples: list[tuple[float, float]] = []
        while child.poll() is None:
            mb = rss_mb(child.pid)
            if mb is not None:
                samples.append((time.monotonic() - t0, mb))
            time.sleep(args.every)
        output = child.stdout.read() if child.stdout else ""
        elapsed = time.monotonic() - t0
        out_frames = read_wav(tmp / "output.wav")[0].shape[0] if child.returncode == 0 else 0

    if child.returncode != 0 or len(samples) < 4:
        print(output)
        print(f"longrun: the run failed (exit {child.returncode})", file=sys.stderr)
        return 1
    match = re.search(r"([\d.]+)x real time", output)
    settled = [mb for t, mb in samples if t >= 0.1 * elapsed]
    start_mb, end_mb = settled[0], float(np.median([mb for _, mb in samples[-3:]]))
    report = {
        "steps": args.steps, "audio_minutes": args.steps * 0.08 / 60,
        "wall_minutes": elapsed / 60, "speed_x_real_time": float(match.group(1)) if match else None,
        "rss_mb_settled": start_mb, "rss_mb_end": end_mb,
        "rss_mb_max": max(mb for _, mb in samples),
        "rss_growth_mb": end_mb - start_mb, "output_samples": out_frames,
        "samples": [(round(t, 1), round(mb, 1)) for t, mb in samples],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(f"{args.steps} steps ({report['audio_minutes']:.1f} min of audio) in "
          f"{report['wall_minutes']:.1f} min; RSS {start_mb:.1f} MB after settling -> "
          f"{end_mb:.1f} MB at the end (growth {end_mb - start_mb:+.1f} MB, max "
          f"{report['rss_mb_max']:.1f} MB); report: {args.json}")
    assert out_frames == args.steps * FRAME_SIZE, "the output is not as long as the input"
    if end_mb - start_mb > args.max_growth_mb:
        print(f"longrun: RSS grew by more than {args.max_growth_mb} MB", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
