"""moshivis-mlx: talk with your Mac about a picture."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moshivis_mlx.app.options import AppOptions

DESCRIPTION = """\
Talk with your Mac about a picture: Kyutai's MoshiVis listens to the microphone, looks at
the image and answers out loud, in real time. The transcript scrolls in the terminal, each
word coloured by how much the model was looking at the image when it said it.
"""

EPILOG = """\
keys (live mode):
  i        load another image (type its path, Enter)     r  restart the conversation
  space    mute / unmute the microphone                   q  quit (Ctrl-C works too)

examples:
  moshivis-mlx --image photo.jpg                     talk about photo.jpg
  moshivis-mlx --image photo.jpg -q 4                4-bit weights (less memory)
  moshivis-mlx --list-devices                        which microphones and speakers exist
  moshivis-mlx --image photo.jpg --input-wav question.wav --output-wav answer.wav
  moshivis-mlx --demo                                offline demo on a tiny random model

The first run downloads Kyutai's bf16 model from Hugging Face (large: once) and converts
it (8-bit by default) into ~/.cache/moshivis-mlx. Each session is saved (stereo WAV,
transcript with gate values, latency trace) under ./moshivis-sessions/ unless --no-record.
"""


DEFAULT_HF_REPO = "kyutai/moshika-vis-pytorch-bf16"


def quantize_arg(q: str) -> str:
    """-q: 8, 4 or none."""
    q = str(q).lower()
    if q not in ("8", "4", "none"):
        raise argparse.ArgumentTypeError("choose 8, 4 or none")
    return q


def device_arg(spec: str) -> int | str | None:
    """--input-device / --output-device: a device number or part of its name."""
    if spec.strip() == "":
        return None
    return int(spec) if spec.strip().isdigit() else spec


def build_parser() -> argparse.ArgumentParser:
    # Nothing heavy is imported before the arguments are parsed: --help is instant.
    p = argparse.ArgumentParser(prog="moshivis-mlx", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    img = p.add_mutually_exclusive_group()
    img.add_argument("--image", metavar="PATH",
                     help="the picture to talk about (JPEG, PNG, ...; press i to change it)")
    img.add_argument("--no-image", action="store_true",
                     help="plain Moshi: no image encoder is loaded, no image is used")

    w = p.add_argument_group("model")
    w.add_argument("--weights", metavar="DIR",
                   help="a bundle directory made by moshivis-convert (overrides --hf-repo)")
    w.add_argument("--hf-repo", metavar="REPO", default=DEFAULT_HF_REPO,
                   help=f"Hugging Face repository to download and convert once "
                        f"(default: {DEFAULT_HF_REPO})")
    w.add_argument("-q", "--quantize", type=quantize_arg, metavar="8|4|none",
                   help="weight quantization when converting --hf-repo (default: 8)")
    w.add_argument("--adapters", metavar="DIR",
                   help="fine-tuned adapters (moshivis-train's OUT/adapters) on top of the bundle")

    a = p.add_argument_group("audio (live mode)")
    a.add_argument("--list-devices", action="store_true",
                   help="list microphones and speakers, then exit")
    a.add_argument("--input-device", metavar="DEV", type=device_arg,
                   help="microphone: number or part of the name (default: the system's)")
    a.add_argument("--output-device", metavar="DEV", type=device_arg,
                   help="speaker: number or part of the name (default: the system's)")
    a.add_argument("--record", metavar="DIR",
                   help="save the session here (default: ./moshivis-sessions/<date-time>/)")
    a.add_argument("--no-record", action="store_true", help="do not save the session")

    f = p.add_argument_group("file mode (no audio devices)")
    f.add_argument("--input-wav", metavar="IN.wav",
                   help="the user's side of the conversation (any rate, any channels)")
    f.add_argument("--output-wav", metavar="OUT.wav", help="the model's side, 24 kHz mono")
    f.add_argument("--transcript", metavar="T.json",
                   help="also write the model's words with times and gate values")
    f.add_argument("--answer-silence", type=float, default=2.0, metavar="S",
                   help="after the question, the answer has ended once the model has been "
                        "silent (no words, near-silent voice) this long (default 2 s)")
    f.add_argument("--max-answer-seconds", type=float, default=30.0, metavar="S",
                   help="the longest the answer may go on after the question (default 30)")
    f.add_argument("--same-length", action="store_true",
                   help="stop when the question ends: the answer is exactly as long, frame "
                        "i of it what the model said while frame i was heard")
    f.add_argument("--demo", action="store_true",
                   help="offline demo: a tiny random model (made on first use) answers a "
                        "sample question about a sample picture; the answer is noise")

    from moshivis_mlx.sampling import KYUTAI_GENERATION as g

    s = p.add_argument_group("sampling (defaults: the bundle's, else Kyutai's)")
    s.add_argument("--text-temperature", type=float, metavar="T",
                   help=f"text (Kyutai's: {g.text_temperature})")
    s.add_argument("--audio-temperature", type=float, metavar="T",
                   help=f"audio (Kyutai's: {g.audio_temperature})")
    s.add_argument("--top-k", type=int, metavar="K",
                   help=f"keep the K likeliest tokens, text and audio (Kyutai's: "
                        f"{g.text_top_k} / {g.audio_top_k})")
    s.add_argument("--top-p", type=float, metavar="P",
                   help="nucleus sampling for text and audio (default off)")
    s.add_argument("--seed", type=int, help="make sampling reproducible")
    s.add_argument("--xa-start", type=int, metavar="STEPS",
                   help=f"steps before the model starts looking at the image (Kyutai's: "
                        f"{g.xa_start})")

    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.input_wav and not args.output_wav:
        p.error("--input-wav needs --output-wav")
    if args.output_wav and not args.input_wav:
        p.error("--output-wav needs --input-wav")
    if args.transcript and not args.input_wav:
        p.error("--transcript is for file mode (--input-wav); live sessions are saved "
                "with --record")
    if args.record and args.no_record:
        p.error("--record and --no-record contradict each other")
    for name in ("text_temperature", "audio_temperature"):
        v = getattr(args, name)
        if v is not None and v < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0")
    if args.top_k is not None and args.top_k < 0:
        p.error("--top-k must be >= 0")
    if args.top_p is not None and not 0 <= args.top_p <= 1:
        p.error("--top-p must be in [0, 1]")
    if args.xa_start is not None and args.xa_start < 0:
        p.error("--xa-start must be >= 0")
    if not args.answer_silence > 0 or not args.max_answer_seconds >= 0:
        p.error("--answer-silence must be > 0 and --max-answer-seconds >= 0")


def options_from(args: argparse.Namespace) -> AppOptions:
    """The parsed command line as the app's typed options (the only place that reads it)."""
    from moshivis_mlx.app.options import AppOptions, ModelOptions

    model = ModelOptions(
        hf_repo=args.hf_repo, weights=Path(args.weights) if args.weights else None,
        quantize=args.quantize, text_temperature=args.text_temperature,
        audio_temperature=args.audio_temperature, top_k=args.top_k, top_p=args.top_p,
        xa_start=args.xa_start, seed=args.seed,
        adapters=Path(args.adapters) if args.adapters else None)
    return AppOptions(
        model=model, image=args.image, no_image=args.no_image,
        input_device=args.input_device, output_device=args.output_device,
        record=not args.no_record, record_dir=Path(args.record) if args.record else None,
        input_wav=args.input_wav, output_wav=Path(args.output_wav) if args.output_wav else None,
        transcript=Path(args.transcript) if args.transcript else None,
        same_length=args.same_length, answer_silence=args.answer_silence,
        max_answer_seconds=args.max_answer_seconds,
        demo=args.demo, list_devices=args.list_devices, debug=args.debug)


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    check_args(p, args)
    from moshivis_mlx.app.main import run_cli

    return run_cli(options_from(args))


if __name__ == "__main__":
    sys.exit(main())
