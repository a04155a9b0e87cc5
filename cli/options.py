"""Options the commands share, spelled once: which model (--weights, --hf-repo,
--adapters), its quantization (-q/--quantize q8|q4|bf16, the same in all five), and when an
answer has ended (the app's file mode and the evaluation)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

QUANTIZE_METAVAR = "q8|q4|bf16"


def quantize_arg(text: str) -> str:
    """-q/--quantize: a preset, any case; the earlier 8, 4 and none are still understood."""
    from moshivis_mlx.errors import UsageError
    from moshivis_mlx.quant import preset_key

    try:
        return preset_key(text)
    except UsageError:
        raise argparse.ArgumentTypeError("choose q8 (8-bit, group 64), q4 (4-bit, group 32) "
                                         "or bf16 (not quantized)") from None


def add_quantize(group: Any, what: str, default: str | None = None) -> None:
    """-q/--quantize PRESET, saying `what` it quantizes. `--quant`, the benchmark's and the
    converter's earlier spelling, stays as a hidden alias."""
    shown = default or "q8"
    group.add_argument("-q", "--quantize", type=quantize_arg, default=default,
                       metavar=QUANTIZE_METAVAR,
                       help=f"{what}: q8 = 8-bit groups of 64, q4 = 4-bit groups of 32, bf16 = "
                            f"not quantized (default {shown})")
    group.add_argument("--quant", dest="quantize", type=quantize_arg, help=argparse.SUPPRESS)


def add_bundle_options(group: Any, adapters: bool = True) -> None:
    """--weights, --hf-repo, -q/--quantize and (if wanted) --adapters."""
    from moshivis_mlx.loader import DEFAULT_HF_REPO

    group.add_argument("--weights", type=Path, metavar="DIR",
                       help="a bundle directory made by moshivis-convert (overrides --hf-repo)")
    group.add_argument("--hf-repo", metavar="REPO", default=DEFAULT_HF_REPO,
                       help="a Hugging Face repository (or a folder of its files) to download "
                            "and convert once (default %(default)s)")
    add_quantize(group, "the quantization --hf-repo is converted to")
    if adapters:
        group.add_argument("--adapters", type=Path, metavar="DIR",
                           help="fine-tuned adapters (moshivis-train's OUT/adapters) on the model")


def bundle_options(args: argparse.Namespace):
    """The shared options as the tools take them."""
    from moshivis_mlx.loader import BundleOptions

    return BundleOptions(weights=args.weights, hf_repo=args.hf_repo, quantize=args.quantize,
                         adapters=getattr(args, "adapters", None))


def add_answer_end(group: Any) -> None:
    """--answer-silence and --max-answer-seconds (the evaluation's earlier --silence-s and
    --max-answer-s stay as hidden aliases); defaults from the session's."""
    from moshivis_mlx.session import ANSWER_SILENCE_S, MAX_ANSWER_S

    group.add_argument("--answer-silence", type=float, default=ANSWER_SILENCE_S, metavar="S",
                       help="after the question, the answer has ended once the model has been "
                            "silent this long (default %(default)g s)")
    group.add_argument("--silence-s", dest="answer_silence", type=float, help=argparse.SUPPRESS)
    group.add_argument("--max-answer-seconds", type=float, default=MAX_ANSWER_S, metavar="S",
                       help="the longest the answer may go on after the question (default "
                            "%(default)g s)")
    group.add_argument("--max-answer-s", dest="max_answer_seconds", type=float,
                       help=argparse.SUPPRESS)


def answer_end_error(args: argparse.Namespace) -> str | None:
    """What is wrong with the answer-end options (None: nothing)."""
    from moshivis_mlx.errors import UsageError, check_option
    from moshivis_mlx.session import ANSWER_LIMIT_S

    try:
        for flag, value in (("--answer-silence", args.answer_silence),
                            ("--max-answer-seconds", args.max_answer_seconds)):
            check_option(flag, value, 0, ANSWER_LIMIT_S, open_low=True, unit="seconds")
    except UsageError as e:
        return e.message
    return None
