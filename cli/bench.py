"""moshivis-bench: latency of the MoshiVis step and of the whole 80 ms frame, in MLX."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moshivis_mlx.errors import guard

EPILOG = """examples:
  moshivis-bench                                   # MoshiVis 7B q8, 3750 steps (5 minutes)
  moshivis-bench --config tiny --steps 500 --json tiny.json --plot tiny.png
  moshivis-bench -q q4 --steps 1000 --scenarios frame,frame-image --json q4.json
  moshivis-bench --weights ~/moshivis-q8          # a converted bundle, its own Mimi and SigLIP
  moshivis-bench --codec-device cpu                # Mimi on the CPU, the LM on the GPU
  moshivis-bench --compare before.json after.json
  moshivis-bench --count-kernels                   # kernels per step and frame, CUDA/Metal/CPU
  moshivis-bench --count-kernels --devices metal -q q4 --json k.json

scenarios:
  moshi        the language-model step without an image (exactly plain Moshi)
  moshivis     the language-model step with a 1024-token image
  frame        the whole frame a user waits for: Mimi encoder + step + Mimi decoder,
  frame-image  one graph evaluated once, without / with the image; also the host's share
               of each frame and each stage timed on its own

--count-kernels counts, instead of timing, the device kernels one step and one whole frame
launch, as MLX's CUDA, Metal and CPU builds would (exact on any machine: the graph of a
step is built and counted, never run), by part and by primitive, at the 7B's structure
with tiny widths, and times the host's share of building a step and a frame here.
"""


def build_parser() -> argparse.ArgumentParser:
    from moshivis_mlx.cli.options import add_quantize

    from moshivis_mlx.bench import SCENARIOS
    from moshivis_mlx.kernels import DEVICES
    from moshivis_mlx.stream import CODEC_DEVICES

    p = argparse.ArgumentParser(
        prog="moshivis-bench",
        description="Time the model step and the whole 80 ms frame (random weights, or a "
                    "bundle): p50/p90/p99/max latency, first step (compilation), load time, "
                    "peak memory; a JSON report and a latency plot like the paper's Figure 6.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="moshivis-7b", choices=["moshivis-7b", "moshi-7b", "tiny"],
                   help="model size (default: moshivis-7b)")
    add_quantize(p, "the random model's weights (a bundle's are as converted)", default="q8")
    p.add_argument("--weights", type=Path, metavar="DIR",
                   help="time a converted bundle (its LM, Mimi and image encoder) instead")
    p.add_argument("--kv-bits", type=int, choices=(8,),
                   help="store the attention caches quantized (less memory; default: full "
                        "precision)")
    p.add_argument("--adapters", type=Path, metavar="DIR",
                   help="fine-tuned adapters (moshivis-train's OUT/adapters) on the model")
    p.add_argument("--steps", type=int, default=3750,
                   help="timed steps per scenario (default 3750 = 5 minutes of audio)")
    p.add_argument("--warmup", type=int, default=32,
                   help="untimed steps per scenario after each variant of the step has "
                        "compiled once (default 32; 0 is allowed)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS),
                   help="comma-separated (default: all, %(default)s)")
    p.add_argument("--pipelined", action="store_true",
                   help="submit each step before collecting the previous one (file mode's "
                        "throughput) instead of one step's latency")
    p.add_argument("--codec-device", choices=CODEC_DEVICES, default="default",
                   help="where Mimi runs: on the LM's device (default), MLX's Mimi on the CPU "
                        "(cpu), or Kyutai's Rust Mimi on the CPU (rust: pip install rustymimi)")
    p.add_argument("--codec-frames", type=int, default=50,
                   help="frames of streaming Mimi encode+decode to time on their own (0: skip; "
                        "default %(default)s)")
    p.add_argument("--image-encodes", type=int, default=3,
                   help="photos to encode with the SigLIP tower after a warm-up (0: skip; "
                        "default %(default)s)")
    p.add_argument("--json", type=Path, metavar="F", help="write the report as JSON")
    p.add_argument("--plot", type=Path, metavar="F.png", help="write the latency plot")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare", nargs=2, type=Path, metavar=("A.json", "B.json"),
                   help="compare two reports instead of running")
    p.add_argument("--count-kernels", action="store_true",
                   help="count the kernels of a step and a frame (per device build, by part "
                        "and by primitive) and the host's time to build them, instead of "
                        "timing; takes -q, --devices, --json")
    p.add_argument("--devices", default=",".join(DEVICES),
                   help="with --count-kernels: the builds to count for, comma-separated "
                        "(default: all, %(default)s)")
    p.add_argument("--debug", action="store_true", help="show a traceback on errors")
    return p


def run(args: argparse.Namespace) -> int:
    from moshivis_mlx import bench

    if args.compare:
        print(bench.compare(bench.load_json(args.compare[0]), bench.load_json(args.compare[1])))
        return 0
    _check_outputs(args)  # before minutes of timing, not after
    if args.count_kernels:
        return _count_kernels(bench, args)
    opts = bench.BenchOptions(
        config=args.config, quant=args.quantize, steps=args.steps, warmup=args.warmup,
        scenarios=tuple(s.strip() for s in args.scenarios.split(",") if s.strip()),
        weights=args.weights, pipelined=args.pipelined, seed=args.seed,
        codec_frames=args.codec_frames, image_encodes=args.image_encodes,
        codec_device=args.codec_device, adapters=args.adapters, kv_bits=args.kv_bits)
    report = _with_progress(lambda progress: bench.run(opts, progress))
    print(bench.summary(report))
    if args.json:
        bench.save_json(report, args.json)
        print(f"report: {args.json}")
    if args.plot:
        from moshivis_mlx.plot import plot_latency

        plot_latency(report, args.plot)
        print(f"plot: {args.plot}")
    return 0


def _count_kernels(bench, args: argparse.Namespace) -> int:
    from moshivis_mlx.errors import UsageError

    if args.plot or args.weights:
        raise UsageError("--count-kernels counts the 7B's structure at tiny widths: it takes "
                         "neither --plot nor --weights")
    devices = tuple(d.strip() for d in args.devices.split(",") if d.strip())
    report = _with_progress(
        lambda progress: bench.kernel_report(args.quantize, devices, progress, seed=args.seed))
    print(bench.kernel_summary(report))
    if args.json:
        bench.save_json(report, args.json)
        print(f"report: {args.json}")
    return 0


def _check_outputs(args: argparse.Namespace) -> None:
    """--json and --plot: writable, and neither the bundle nor each other."""
    from moshivis_mlx.paths import check_outputs, check_writable

    check_outputs({"--json": args.json, "--plot": args.plot}, {"--weights": args.weights})
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path is not None:
            check_writable(path, f"write {flag}")


def _with_progress(run):
    """run(progress) with bars on a terminal; elsewhere (make bench, CI logs) a line per
    phase and quarter."""
    from moshivis_mlx.progress import Counter

    with Counter(every=0.25) as bars:
        def progress(label, total):
            if not bars.console.is_terminal:
                bars.console.print(label, highlight=False)
            task = bars.add(label, total)
            return lambda: bars.advance(task)

        return run(progress)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return guard("moshivis-bench", lambda: run(args), args.debug,
                 exit_code=lambda e: 1)


if __name__ == "__main__":
    sys.exit(main())
