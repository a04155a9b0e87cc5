"""moshivis-convert: Kyutai checkpoints -> a ready moshivis-mlx bundle directory."""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import replace
from pathlib import Path

from moshivis_mlx.cli.options import add_quantize

from moshivis_mlx.errors import EXIT_ERROR, UsageError, guard
from moshivis_mlx.quant import GROUP_SIZES, PRESETS, QuantSpec

DESCRIPTION = """\
Convert Kyutai's Moshi / MoshiVis checkpoints (PyTorch or MLX, on Hugging Face or local)
or one of our bundles into a moshivis-mlx bundle directory (config.json, model*.safetensors,
vision.safetensors, mimi.safetensors, tokenizer.model), 8-bit quantized by default.
"""

EPILOG = """examples:
  moshivis-convert --hf-repo kyutai/moshika-vis-pytorch-bf16 --out moshika-vis-q8
  moshivis-convert --hf-repo kyutai/moshiko-pytorch-bf16 -q q4 --out moshiko-q4
  moshivis-convert --hf-repo kyutai/moshika-vis-mlx --moshi-weights model.q8.safetensors --out q8
  moshivis-convert --moshi-weights model.safetensors --mimi-weights mimi.safetensors --tokenizer tokenizer_spm_32k_3.model --out moshivis-q8
  moshivis-convert --bundle moshika-vis-q8 -q bf16 --out moshika-vis-bf16
  moshivis-convert --bundle moshika-vis-q8 --adapters runs/a/adapters --out moshika-vis-a
  moshivis-convert --hf-repo kyutai/moshika-vis-pytorch-bf16 --dry-run
  moshivis-convert --dry-run --manifest tests/data/manifests/moshivis.mlx.json
"""  # noqa: E501 (a command line is not wrapped: it is copied as is)

SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?i?B?)\s*", re.IGNORECASE)
UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    """'5GB', '500MB', '64KB' (powers of 1024, as mlx-lm counts its 5 GB shards) or bytes."""
    m = SIZE.fullmatch(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MB)")
    value = float(m.group(1)) * UNITS[m.group(2)[:1].upper()]
    if value < 1:
        raise argparse.ArgumentTypeError(f"shard size must be positive, got {text!r}")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moshivis-convert",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s = p.add_argument_group(
        "source", "a Hugging Face repository, one of our bundles, or local files; with "
        "--hf-repo the file options below override the repository's files (a local path, "
        "hf://owner/repo/file, or the name of a file of the repository)")
    s.add_argument("--hf-repo", "--hf-path", metavar="REPO",
                   help="Kyutai repository (e.g. kyutai/moshika-vis-pytorch-bf16), or a local "
                        "folder holding its files; its config.json is honoured")
    s.add_argument("--bundle", type=Path, metavar="DIR",
                   help="one of our bundles: re-quantize (-q), dequantize (-q bf16) or change "
                        "--dtype")
    s.add_argument("--adapters", type=Path, metavar="DIR",
                   help="with --bundle: merge trained adapters (moshivis-train's OUT/adapters) "
                        "into the new bundle")
    s.add_argument("--moshi-weights", metavar="F.safetensors",
                   help="language model (Moshi / MoshiVis PyTorch, or Kyutai's MLX layout, "
                        "quantized or not)")
    s.add_argument("--config", metavar="C.json",
                   help="Kyutai's config.json (default: the repository's, else the released "
                        "7B settings)")
    s.add_argument("--mimi-weights", metavar="F.safetensors",
                   help="Mimi codec (Kyutai's PyTorch layout); always stored float32")
    s.add_argument("--mimi-config", metavar="C.json",
                   help="Kyutai's Mimi config (default: the released Mimi)")
    s.add_argument("--tokenizer", metavar="F.model",
                   help="SentencePiece text tokenizer (tokenizer_spm_32k_3.model)")
    v = p.add_argument_group(
        "image encoder",
        "MoshiVis' SigLIP tower; taken from the language-model file when that holds it")
    v.add_argument("--vision-weights", metavar="F.safetensors",
                   help="SigLIP vision tower (HF vision_model.*, MoshiVis image_prefix.enc.model.* "
                        "or img_embedder.model.* layout)")
    v.add_argument("--vision-config", type=Path, metavar="C.json",
                   help="HF SiglipVisionConfig JSON of the tower (default: PaliGemma2-448's)")
    v.add_argument("--vision-float", action="store_true",
                   help="keep the tower in --dtype even when quantizing (else it is quantized "
                        "at 8 bits whatever --q-bits says)")
    o = p.add_argument_group("output")
    o.add_argument("--out", "--mlx-path", type=Path, metavar="DIR",
                   help="bundle directory to write (written to a temporary directory, renamed "
                        "when complete)")
    o.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                   help="dtype of the float tensors (default: bfloat16; for --bundle, the "
                        "bundle's)")
    add_quantize(o, "linear and embedding layers (bf16: every tensor in --dtype, quantized "
                    "sources dequantized)", default="q8")
    # Earlier spellings of -q bf16.
    o.add_argument("--no-quantize", "--dequantize", dest="quantize", action="store_const",
                   const="bf16", help=argparse.SUPPRESS)
    o.add_argument("--q-bits", type=int, choices=[4, 8],
                   help="bits per weight, overriding the preset's")
    o.add_argument("--q-group-size", type=int, choices=list(GROUP_SIZES),
                   help="weights sharing one scale and bias (default: the preset's for the bits: "
                        "64 at 8 bits, 32 at 4)")
    o.add_argument("--shard-size", type=parse_size, default="5GB", metavar="SIZE",
                   help="largest weights file; larger parts are sharded with an index, as "
                        "mlx-lm does (default 5GB)")
    o.add_argument("--force", action="store_true", help="replace an existing output directory")
    d = p.add_argument_group("planning")
    d.add_argument("--dry-run", action="store_true",
                   help="read the headers only and print the plan: every source tensor, its "
                        "destination, dtype and size, and the bundle's size at bf16, q8, q4")
    d.add_argument("--manifest", type=Path, metavar="M.json",
                   help="with --dry-run: plan from a manifest (names, shapes, dtypes) instead "
                        "of weights")
    p.add_argument("--debug", action="store_true", help="show a traceback on errors")
    return p


def quantization(args: argparse.Namespace) -> QuantSpec | None:
    """-q's preset, its bits or group size overridden by --q-bits / --q-group-size."""
    spec = PRESETS[args.quantize]
    if args.q_bits is None and args.q_group_size is None:
        return spec
    if spec is None:
        raise UsageError("-q bf16 quantizes nothing: drop --q-bits / --q-group-size, or "
                         "choose -q q8 or q4")
    bits = args.q_bits or spec.bits
    return QuantSpec(bits, args.q_group_size or PRESETS[f"q{bits}"].group_size)


def _path(x: str | None) -> Path | None:
    return Path(x) if x is not None else None


def options_from(args: argparse.Namespace):
    from moshivis_mlx.weights_convert.convert import ConvertOptions

    if args.hf_repo and args.bundle:
        raise UsageError("give either --hf-repo or --bundle, not both")
    if args.adapters and not args.bundle:
        raise UsageError("--adapters merges into one of our bundles: give --bundle too")
    if args.manifest and not args.dry_run:
        raise UsageError("a manifest holds no data: use --manifest with --dry-run")
    if args.out is None and not args.dry_run:
        raise UsageError("no output directory: give --out DIR (or --dry-run)")
    common = dict(out=args.out, dtype=args.dtype, quantization=quantization(args),
                  force=args.force, vision_config=args.vision_config,
                  vision_float=args.vision_float, shard_size=args.shard_size,
                  vision_weights=_path(args.vision_weights))
    if args.hf_repo:
        from moshivis_mlx.weights_convert.hub import resolve_repo

        files = resolve_repo(args.hf_repo, moshi_weights=args.moshi_weights,
                             mimi_weights=args.mimi_weights, tokenizer=args.tokenizer,
                             config=args.config, mimi_config=args.mimi_config,
                             headers_only=args.dry_run)
        return replace(files, **common)
    return ConvertOptions(
        moshi_weights=_path(args.moshi_weights), kyutai_config=_path(args.config),
        mimi_weights=_path(args.mimi_weights), mimi_config=_path(args.mimi_config),
        tokenizer=_path(args.tokenizer), bundle=args.bundle, manifest=args.manifest,
        adapters=args.adapters, **common)


def byte_bars():
    """The conversion's progress: one bar per part, in bytes written, on stderr (the
    command shows it when stderr is a terminal)."""
    from rich.console import Console

    from moshivis_mlx.progress import Counter

    return Counter(Console(stderr=True), unit="bytes", transient=False, show=True)


def run(args: argparse.Namespace) -> int:
    from moshivis_mlx.weights_convert.convert import convert, dry_run, human

    from moshivis_mlx.bundle import read_config

    opts = options_from(args)
    if args.dry_run:
        print("\n".join(dry_run(opts)))
        return 0
    if sys.stderr.isatty():
        with byte_bars() as bars:
            out = convert(opts, bars.track)
    else:
        out = convert(opts)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"wrote {out} ({human(size)})")
    cfg = read_config(out)
    if cfg.get("lm", {}).get("cross_attention") and "vision" not in cfg:
        print("note: the checkpoint holds no image encoder; convert again adding "
              "--vision-weights (the SigLIP tower of PaliGemma2-3b-pt-448)", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return guard("moshivis-convert", lambda: run(args), args.debug,
                 exit_code=lambda e: EXIT_ERROR, interrupted="interrupted, nothing written",
                 internal_exit=2)


if __name__ == "__main__":
    sys.exit(main())
