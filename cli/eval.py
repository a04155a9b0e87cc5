"""moshivis-eval: the MoshiVis paper's spoken visual benchmarks (Babillage)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DESCRIPTION = """\
Score MoshiVis on Kyutai's Babillage, the spoken versions of COCO captioning (CIDEr-D),
VQAv2 (VQA accuracy) and OCR-VQA (accuracy): each question is asked, spoken (--mode
audio) or in the text stream (--mode text), about its image, and the model's answer is
scored against the benchmark's references. Predictions are written as they come (a rerun
resumes), then metrics.json and results.md.
"""

EPILOG = """\
examples:
  moshivis-eval --task coco --data Babillage --images val2014 \\
      --annotations captions_val2014.json --out runs/coco-audio
  moshivis-eval --task ocrvqa --data Babillage/ocrvqa --images ocrvqa/images \\
      --mode text --limit 500 --out runs/ocr-text
  moshivis-eval --task vqav2 ... --shard 0/4 --out runs/vqa-0     (and 1/4, 2/4, 3/4)
  moshivis-eval merge --out runs/vqa runs/vqa-0 runs/vqa-1 runs/vqa-2 runs/vqa-3

See docs/EVAL.md for the downloads and the paper's numbers.
"""




def build_parser() -> argparse.ArgumentParser:
    from moshivis_mlx.cli.options import add_answer_end, add_bundle_options

    p = argparse.ArgumentParser(prog="moshivis-eval", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group("benchmark")
    d.add_argument("--task", required=True, metavar="coco|vqav2|ocrvqa")
    d.add_argument("--data", required=True, type=Path, metavar="DIR_OR_PARQUET",
                   help="Babillage: its folder, the task's folder, or parquet files")
    d.add_argument("--split", help="validation or test (default: test; VQAv2: validation)")
    d.add_argument("--images", required=True, type=Path, metavar="DIR",
                   help="the benchmark's images (COCO val2014, OCR-VQA's images)")
    d.add_argument("--annotations", type=Path, metavar="FILE",
                   help="references: COCO captions (coco), VQAv2 annotations (vqav2), "
                        "answers by sample id (ocrvqa; default: Babillage's answers)")
    d.add_argument("--mode", default="audio", metavar="audio|text",
                   help="audio: the question spoken; text: as text in the text stream "
                        "(default %(default)s)")
    d.add_argument("--limit", type=int, metavar="N", help="only the first N samples")
    d.add_argument("--shard", default="0/1", metavar="I/N",
                   help="this process's share: image groups I, I+N, I+2N, ... (I from 0; "
                        "default %(default)s)")
    d.add_argument("--out", required=True, type=Path, metavar="DIR",
                   help="predictions.jsonl, metrics.json, results.md (a rerun resumes)")

    m = p.add_argument_group("model")
    add_bundle_options(m)
    m.add_argument("--seed", type=int,
                   help="sample with the bundle's settings, seeded (default: greedy)")

    a = p.add_argument_group("the conversation")
    a.add_argument("--opening-s", type=float, default=2.0, metavar="S",
                   help="silence before the question, for the model's greeting (default 2)")
    add_answer_end(a)
    a.add_argument("--ptb", default="python", metavar="python|java",
                   help="CIDEr's tokenizer: python, or pycocoevalcap's java one "
                        "(default %(default)s)")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    return p


def build_merge_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moshivis-eval merge",
                                description="Join the shards of one evaluation and score it.")
    p.add_argument("--out", required=True, type=Path, metavar="DIR")
    p.add_argument("shards", nargs="+", type=Path, metavar="SHARD_DIR")
    p.add_argument("--debug", action="store_true")
    return p


def _merge(argv: list[str]) -> int:
    args = build_merge_parser().parse_args(argv)

    def run() -> int:
        from moshivis_mlx.eval.report import merge

        m = merge(args.out, args.shards)
        missing = m.get("shards", {}).get("missing")
        print(f"{m['metric']}: {m['score']:.1f} (95% CI {m['ci95'][0]:.1f}-{m['ci95'][1]:.1f}), "
              f"{m['samples_scored']} of {m['samples_planned']} samples -> {args.out}"
              + (f"; shards missing: {missing}" if missing else ""))
        return 0

    from moshivis_mlx.errors import guard

    return guard("moshivis-eval", run, args.debug)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["merge"]:
        return _merge(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    from moshivis_mlx.cli.options import answer_end_error

    if error := answer_end_error(args):
        parser.error(error)

    def run() -> int:
        from moshivis_mlx.cli.options import bundle_options
        from rich.console import Console

        from moshivis_mlx.eval.answer import AnswerSettings
        from moshivis_mlx.eval.run import EvalOptions, evaluate, parse_shard

        opts = EvalOptions(
            task=args.task, data=args.data, images=args.images, out=args.out,
            annotations=args.annotations, split=args.split, mode=args.mode, limit=args.limit,
            shard=parse_shard(args.shard), bundle=bundle_options(args), seed=args.seed,
            ptb=args.ptb,
            settings=AnswerSettings(args.opening_s, args.answer_silence,
                                    args.max_answer_seconds))
        evaluate(opts, Console(stderr=False))
        return 0

    from moshivis_mlx.errors import guard

    return guard("moshivis-eval", run, args.debug)


if __name__ == "__main__":
    sys.exit(main())
