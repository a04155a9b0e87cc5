"""moshivis-convert: Kyutai checkpoints -> a ready moshivis-mlx bundle directory."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moshivis_mlx.bundle import read_config
from weights_convert.convert import ConvertOptions, Quantization, convert
from weights_convert.safetensors_io import WeightsError

EPILOG = """examples:
  moshivis-convert --moshi-weights model.safetensors --out moshivis-q8
  moshivis-convert --moshi-weights model.safetensors --config config.json --dtype float32 --out f32
  moshivis-convert --moshi-weights model.safetensors --mimi-weights mimi.safetensors --out q8
  moshivis-convert --mimi-weights mimi.safetensors --mimi-config mimi.json --out codec-only
  moshivis-convert --vision-weights siglip.safetensors --vision-config siglip.json --out vision
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moshivis-convert",
        description="Convert Kyutai's Moshi / MoshiVis checkpoints (safetensors) into a "
                    "moshivis-mlx bundle directory, 8-bit quantized by default. Give at "
                    "least one of --moshi-weights, --mimi-weights and --vision-weights.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--moshi-weights", type=Path, metavar="F.safetensors",
                   help="language-model weights (Moshi or MoshiVis PyTorch layout)")
    p.add_argument("--config", type=Path, metavar="C.json",
                   help="Kyutai's config.json for the weights (default: the released 7B settings)")
    p.add_argument("--mimi-weights", type=Path, metavar="F.safetensors",
                   help="Mimi codec weights (Kyutai's PyTorch layout); always stored float32")
    p.add_argument("--mimi-config", type=Path, metavar="C.json",
                   help="Kyutai's Mimi config for --mimi-weights (default: the released Mimi)")
    v = p.add_argument_group(
        "image encoder",
        "MoshiVis' SigLIP tower; taken from --moshi-weights when that file holds it")
    v.add_argument("--vision-weights", type=Path, metavar="F.safetensors",
                   help="SigLIP vision tower (HF vision_model.*, MoshiVis image_prefix.enc.model.* "
                        "or img_embedder.model.* layout)")
    v.add_argument("--vision-config", type=Path, metavar="C.json",
                   help="HF SiglipVisionConfig JSON of the tower (default: PaliGemma2-448's)")
    v.add_argument("--vision-float", action="store_true",
                   help="keep the tower in --dtype even when quantizing (else it is quantized "
                        "at 8 bits whatever --q-bits says)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="bundle directory to write")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="dtype of the float tensors (default: bfloat16)")
    q = p.add_mutually_exclusive_group()
    q.add_argument("-q", "--quantize", action="store_true", default=True,
                   help="quantize linear and embedding layers (the default)")
    q.add_argument("--no-quantize", dest="quantize", action="store_false",
                   help="keep every tensor in --dtype")
    p.add_argument("--q-bits", type=int, default=8, choices=[4, 8], help="bits per weight (default 8)")
    p.add_argument("--q-group-size", type=int, default=64, choices=[32, 64],
                   help="weights sharing one scale and bias (default 64)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--debug", action="store_true", help="show a traceback on errors")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    opts = ConvertOptions(
        out=args.out,
        moshi_weights=args.moshi_weights,
        kyutai_config=args.config,
        mimi_weights=args.mimi_weights,
        mimi_config=args.mimi_config,
        dtype=args.dtype,
        quantization=Quantization(args.q_bits, args.q_group_size) if args.quantize else None,
        force=args.force,
        vision_weights=args.vision_weights,
        vision_config=args.vision_config,
        vision_float=args.vision_float,
    )
    try:
        out = convert(opts)
    except (WeightsError, OSError) as e:
        if args.debug:
            raise
        print(f"moshivis-convert: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("moshivis-convert: interrupted, nothing written", file=sys.stderr)
        return 130
    print(f"wrote {out}")
    cfg = read_config(out)
    if cfg.get("lm", {}).get("cross_attention") and "vision" not in cfg:
        print("note: the checkpoint holds no image encoder; convert again adding "
              "--vision-weights (the SigLIP tower of PaliGemma2-3b-pt-448)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
