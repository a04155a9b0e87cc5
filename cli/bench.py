"""moshivis-bench: per-step latency of Moshi / MoshiVis in MLX on random weights."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EPILOG = """examples:
  moshivis-bench                                   # MoshiVis 7B q8, 3750 steps (5 minutes)
  moshivis-bench --config tiny --steps 500 --json tiny.json --plot tiny.png
  moshivis-bench --quant q4 --steps 1000 --json q4.json
  moshivis-bench --compare before.json after.json
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moshivis-bench",
        description="Time the model step by step (80 ms of audio each) with random weights: "
                    "p50/p90/p99/max latency, first step (compilation), load time, peak memory; "
                    "JSON report and a latency plot like the paper's Figure 6.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="moshivis-7b", choices=["moshivis-7b", "moshi-7b", "tiny"],
                   help="model size (default: moshivis-7b)")
    from moshivis_mlx.quant import PRESETS

    presets = ", ".join(f"{k} = {v.bits}-bit/group {v.group_size}" for k, v in PRESETS.items() if v)
    p.add_argument("--quant", default="q8", choices=list(PRESETS),
                   help=f"weights: bf16, or blockwise quantized ({presets}; default q8)")
    p.add_argument("--weights", type=Path, metavar="DIR", help="time a real bundle instead")
    p.add_argument("--steps", type=int, default=3750, help="timed steps (default 3750 = 5 minutes)")
    p.add_argument("--warmup", type=int, default=32, help="untimed steps first (compilation)")
    p.add_argument("--scenarios", default="moshi,moshivis",
                   help="comma-separated: moshi (no image), moshivis (with an image)")
    p.add_argument("--pipelined", action="store_true",
                   help="submit each step before collecting the previous one (throughput)")
    p.add_argument("--codec-frames", type=int, default=50,
                   help="frames of streaming Mimi encode+decode to time (0: skip)")
    p.add_argument("--image-encodes", type=int, default=3,
                   help="photos to encode with the SigLIP tower after a warm-up (0: skip)")
    p.add_argument("--json", type=Path, metavar="F", help="write the report as JSON")
    p.add_argument("--plot", type=Path, metavar="F.png", help="write the latency plot")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare", nargs=2, type=Path, metavar=("A.json", "B.json"),
                   help="compare two reports instead of running")
    p.add_argument("--debug", action="store_true", help="show a traceback on errors")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from moshivis_mlx import bench

    try:
        if args.compare:
            print(bench.compare(bench.load_json(args.compare[0]), bench.load_json(args.compare[1])))
            return 0
        if args.steps < 1:
            raise ValueError("--steps must be at least 1")
        opts = bench.BenchOptions(
            config=args.config, quant=args.quant, steps=args.steps, warmup=args.warmup,
            scenarios=tuple(s.strip() for s in args.scenarios.split(",") if s.strip()),
            weights=args.weights, pipelined=args.pipelined, seed=args.seed,
            codec_frames=args.codec_frames, image_encodes=args.image_encodes)
        report = _run_with_progress(bench, opts)
    except (ValueError, OSError) as e:
        if args.debug:
            raise
        print(f"moshivis-bench: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("moshivis-bench: interrupted", file=sys.stderr)
        return 130
    print(bench.summary(report))
    if args.json:
        bench.save_json(report, args.json)
        print(f"report: {args.json}")
    if args.plot:
        from moshivis_mlx.plot import plot_latency

        plot_latency(report, args.plot)
        print(f"plot: {args.plot}")
    return 0


def _run_with_progress(bench, opts):
    from moshivis_mlx.progress import Counter

    with Counter() as bars:
        def progress(label, total):
            task = bars.add(label, total)
            return lambda: bars.advance(task)

        bars.console.print(f"building {opts.config if not opts.weights else opts.weights} ...")
        return bench.run(opts, progress)


if __name__ == "__main__":
    sys.exit(main())
