"""moshivis-train: fine-tune MoshiVis' adapters on your pictures and conversations."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DESCRIPTION = """\
Fine-tune MoshiVis' adapters (the gated cross-attention and the image prefix) with the
paper's recipe: the 7B backbone and the image encoder stay frozen (the backbone as the
bundle stores it: q8, q4 or bf16), images are encoded once, speech is Mimi-encoded once
(both cached), speech and speechless samples are mixed by --p-audio, and the loss is
Kyutai's. Writes checkpoints (--resume continues exactly), a log, and OUT/adapters, which
the app, moshivis-bench and moshivis-eval take with --adapters and moshivis-convert
merges into a bundle.
"""

EPILOG = """\
manifests (JSON Lines, paths relative to the manifest):
  {"image": "a.jpg", "turns": [{"role": "user", "text": "What is it?"},
                               {"role": "assistant", "text": "A cat."}]}   (one line)
  {"image": "a.jpg", "audio": "talk.wav", "alignment": "talk.json"}    moshi-finetune's layout
  {"image": "a.jpg", "babillage": "coco/train-00000.parquet", "sample_id": 7}

examples:
  moshivis-train --weights moshika-vis-q8 --train train.jsonl --valid val.jsonl --out runs/a
  moshivis-train --weights moshika-vis-q8 --train train.jsonl --out runs/a --resume
  mlx.launch -n 2 moshivis-train --weights moshika-vis-q8 --train train.jsonl --out runs/b
  moshivis-train --estimate                  memory and time of a full-size step, no weights

See docs/TRAIN.md for the formats, the loss and the memory figures.
"""



def build_parser() -> argparse.ArgumentParser:
    from moshivis_mlx.cli.options import add_bundle_options

    p = argparse.ArgumentParser(prog="moshivis-train", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--train", type=Path, metavar="MANIFEST", help="training samples (.jsonl)")
    d.add_argument("--valid", type=Path, metavar="MANIFEST", help="validation samples")
    d.add_argument("--out", type=Path, metavar="DIR",
                   help="checkpoints, log.jsonl, run.json, cache/, adapters/")
    d.add_argument("--p-audio", type=float, default=0.25, metavar="P",
                   help="chance that a batch slot is a speech sample (default 0.25, the "
                        "paper's trade-off)")
    d.add_argument("--max-seconds", type=float, default=30.0, metavar="S",
                   help="window length: a dialogue is cut into windows of S seconds, each "
                        "a sample, as moshi-finetune's duration_sec (default %(default)g)")
    d.add_argument("--text-past-audio", action="store_true",
                   help="the text of a dialogue's short last window runs on in padding to "
                        "the window's length, as in moshi-finetune (default: it stops with "
                        "the audio)")
    d.add_argument("--speechless-audio", default="zero", metavar="zero|silence",
                   help="audio streams of speechless samples: the zero token (default) or "
                        "Mimi's codes of silence (what moshivis-eval --mode text feeds)")
    d.add_argument("--cache", type=Path, metavar="DIR",
                   help="image tokens and Mimi codes (default OUT/cache)")

    m = p.add_argument_group("model")
    add_bundle_options(m, adapters=False)
    m.add_argument("--no-grad-checkpoint", dest="grad_checkpoint", action="store_false",
                   help="keep every layer's activations (faster, much more memory)")

    t = p.add_argument_group("optimisation")
    t.add_argument("--steps", type=int, default=1000, metavar="N",
                   help="optimizer steps (default %(default)s)")
    t.add_argument("--batch-size", type=int, metavar="B",
                   help="samples per micro-batch, all processes together (default 4; "
                        "--estimate: 1)")
    t.add_argument("--grad-accum", type=int, default=1, metavar="K",
                   help="micro-batches accumulated per step (default 1)")
    t.add_argument("--learning-rate", type=float, default=1e-4, metavar="LR",
                   help="peak learning rate of AdamW (default %(default)g)")
    t.add_argument("--warmup", type=int, metavar="N",
                   help="linear warm-up steps, then cosine decay (default 5%% of --steps)")
    t.add_argument("--weight-decay", type=float, default=0.1, metavar="WD",
                   help="AdamW's weight decay (default %(default)g)")
    t.add_argument("--max-grad-norm", type=float, default=1.0, metavar="NORM",
                   help="gradient norm clipping (0: none; default %(default)g)")
    t.add_argument("--seed", type=int, default=0, metavar="N",
                   help="the data order (default %(default)s)")

    loss = p.add_argument_group("loss (Kyutai's)")
    loss.add_argument("--text-padding-weight", type=float, default=0.5, metavar="W",
                      help="weight of padding text targets (default 0.5)")
    loss.add_argument("--first-codebook-weight", type=float, default=100.0, metavar="W",
                      help="weight of the semantic codebook (default %(default)g)")
    loss.add_argument("--audio-codebooks", type=int, default=2, metavar="N",
                      help="supervise the model's first N codebooks of speech samples "
                           "(default 2, the paper's; 8: all)")
    loss.add_argument("--user-text-weight", type=float, default=1.0, metavar="W",
                      help="weight of the user's turns in speechless samples (0: input only, "
                           "as mlx-lm's --mask-prompt; default %(default)g)")
    loss.add_argument("--text-loss-weight", type=float, default=1.0, metavar="W",
                      help="weight of the text loss (default %(default)g)")
    loss.add_argument("--audio-loss-weight", type=float, default=1.0, metavar="W",
                      help="weight of the audio loss (default %(default)g)")

    r = p.add_argument_group("the run")
    r.add_argument("--resume", action="store_true",
                   help="continue from OUT's last checkpoint (the same settings)")
    r.add_argument("--val-every", type=int, default=100, metavar="N",
                   help="validate every N steps (default %(default)s)")
    r.add_argument("--val-batches", type=int, metavar="N",
                   help="validation batches (default: the whole validation manifest)")
    r.add_argument("--save-every", type=int, default=100, metavar="N",
                   help="save a checkpoint every N steps (default %(default)s)")
    r.add_argument("--keep-checkpoints", type=int, default=2, metavar="N",
                   help="checkpoints kept, the newest, at least 1 (default %(default)s)")
    r.add_argument("--report-every", type=int, default=10, metavar="N",
                   help="report the running loss every N steps (default %(default)s)")
    r.add_argument("--estimate", action="store_true",
                   help="print the memory and time of a full-size adapter step (q8 "
                        "backbone by default, -q to change; --batch-size, --max-seconds) "
                        "and exit")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    return p


def options_from(args: argparse.Namespace):
    from moshivis_mlx.cli.options import bundle_options

    from moshivis_mlx.train.loss import LossConfig
    from moshivis_mlx.train.trainer import TrainOptions

    loss = LossConfig(text_padding_weight=args.text_padding_weight,
                      first_codebook_weight=args.first_codebook_weight,
                      audio_codebooks=args.audio_codebooks, text_weight=args.text_loss_weight,
                      audio_weight=args.audio_loss_weight,
                      user_text_weight=args.user_text_weight)
    return TrainOptions(
        train=args.train, out=args.out, valid=args.valid, bundle=bundle_options(args),
        steps=args.steps,
        batch_size=4 if args.batch_size is None else args.batch_size, grad_accum=args.grad_accum,
        learning_rate=args.learning_rate, warmup=args.warmup, weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm, p_audio=args.p_audio, max_seconds=args.max_seconds,
        text_past_audio=args.text_past_audio,
        seed=args.seed, val_every=args.val_every, val_batches=args.val_batches,
        save_every=args.save_every, keep_checkpoints=args.keep_checkpoints,
        report_every=args.report_every, grad_checkpoint=args.grad_checkpoint,
        speechless_audio=args.speechless_audio, cache=args.cache, resume=args.resume,
        loss=loss)


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if not args.estimate and (args.train is None or args.out is None):
        p.error("--train and --out are required (or --estimate)")

    def run() -> int:
        from rich.console import Console

        if args.estimate:
            from moshivis_mlx.train.estimate import estimate_report
            from moshivis_mlx.train.trainer import LOSS_LIMITS, check_range, check_ranges

            check_ranges({"batch_size": args.batch_size, "max_seconds": args.max_seconds})
            check_range("audio_codebooks", args.audio_codebooks, *LOSS_LIMITS["audio_codebooks"])

            print(estimate_report(quantize=args.quantize or "q8",
                                  batch=1 if args.batch_size is None else args.batch_size,
                                  seconds=args.max_seconds,
                                  audio_codebooks=args.audio_codebooks,
                                  grad_checkpoint=args.grad_checkpoint))
            return 0
        from moshivis_mlx.train.trainer import train

        train(options_from(args), Console(stderr=False))
        return 0

    from moshivis_mlx.errors import guard

    return guard("moshivis-train", run, args.debug)


if __name__ == "__main__":
    sys.exit(main())
