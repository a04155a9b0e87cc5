"""The echo canceller's figures in the simulated room of the tests (docs/APP.md):
ERLE after convergence, the user's voice in double talk, added latency, CPU per frame.

    .venv/bin/python scripts/echo_figures.py [--synthetic]

Real speech needs espeak-ng and sox; --synthetic (or their absence) uses voiced signals.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import echo_room as R  # noqa: E402

from moshivis_mlx.app.echo import EchoCanceller  # noqa: E402

SEC = R.RATE
SINGLE, DT_END, END = 6 * SEC, 9 * SEC, 12 * SEC


def voices(synthetic: bool) -> tuple[np.ndarray, np.ndarray, str]:
    if synthetic or not R.have_speech_tools():
        model, user, kind = R.voiced(12.0, 210.0, seed=1), R.voiced(3.0, 120.0, seed=2), \
            "synthetic voiced signals"
    else:
        model = R.fit(R.spoken(R.MODEL_TEXT, voice="en-us+f3", pitch=60), 12.0)
        user = R.fit(R.spoken(R.USER_TEXT, voice="en-gb+m3", pitch=35), 3.0)
        kind = "espeak-ng speech"
    placed = np.zeros(END, dtype=np.float32)
    placed[SINGLE:DT_END] = user
    return model, placed, kind


def run(model, user, delay_ms, level_db=None):
    room = R.Room(delay_ms=delay_ms)
    echo = room.echo(model)
    echo_mic = echo + room.noise(len(echo), echo)
    near = np.zeros_like(echo)
    if level_db is not None:
        gap = R.energy_db(user[SINGLE:DT_END]) - R.energy_db(echo[SINGLE:DT_END])
        near = user * np.float32(10 ** ((level_db - gap) / 20))
    c = EchoCanceller(delay_ms=delay_ms)
    t0 = time.process_time()
    out = R.run_canceller(c, model, echo_mic + near)
    cpu_ms = 1000 * (time.process_time() - t0) / (END // R.FRAME)
    return echo_mic, near, out, c, cpu_ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--synthetic", action="store_true")
    args = ap.parse_args()
    model, user, kind = voices(args.synthetic)
    print(f"voices: {kind}")
    print("delay ms | ERLE 2 s..6 s | ERLE 4 s..6 s | after double talk | stats at 6 s | "
          "CPU ms/frame")
    for delay in (40, 80, 120, 300, 700):
        echo_mic, _, out, c, cpu = run(model, user, delay)
        start = round((delay / 1000 + 2) * SEC)
        erle = R.erle_db(echo_mic[start:SINGLE], out[start:SINGLE])
        late = R.erle_db(echo_mic[4 * SEC:SINGLE], out[4 * SEC:SINGLE])
        after = R.erle_db(echo_mic[DT_END + SEC:], out[DT_END + SEC:])
        print(f"{delay:8d} | {erle:12.1f} | {late:13.1f} | {after:17.1f} | "
              f"{c.stats.erle_db:12.1f} | {cpu:.2f}")
    print("double talk: correlation with the clean user voice over 6 s..9 s "
          "(canceller / raw microphone)")
    for level in (-6, 0, 6, 12):
        cells = []
        for delay in (40, 80, 120):
            echo_mic, near, out, _, _ = run(model, user, delay, level)
            dt = slice(SINGLE, DT_END)
            cells.append(f"{R.aligned_correlation(out[dt], near[dt]):.3f} / "
                         f"{R.aligned_correlation(echo_mic[dt] + near[dt], near[dt]):.3f}")
        print(f"user {level:+3d} dB vs echo: " + "   ".join(cells))
    silent = np.zeros(3 * SEC, np.float32)
    talk = user[SINGLE:DT_END]
    out = R.run_canceller(EchoCanceller(delay_ms=80), silent, talk)
    lag = R.best_lag(out, talk)
    print(f"latency added (the module's block processing): {lag} samples = "
          f"{1000 * lag / SEC:.1f} ms; the wrapper adds none (no resampling, no buffering)")


if __name__ == "__main__":
    main()
