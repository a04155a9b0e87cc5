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
  c        a new camera snapshot (with --camera)          space  mute / unmute the mic
  q        quit (Ctrl-C works too)

examples:
  moshivis-mlx --image photo.jpg                     talk about photo.jpg
  moshivis-mlx --image photo.jpg -q q4                4-bit weights (less memory)
  moshivis-mlx --list-devices                        which microphones and speakers exist
  moshivis-mlx --camera --camera-every 10            talk about what the webcam sees
  moshivis-mlx --image photo.jpg --no-echo-cancel    with headphones (no echo to remove)
  moshivis-mlx --image photo.jpg --input-wav question.wav --output-wav answer.wav
  moshivis-mlx --demo                                offline demo on a tiny random model
  moshivis-mlx --serve                               talk from a browser: http://127.0.0.1:8998/
  moshivis-mlx --serve --host 0.0.0.0                from a phone on the network (https, token)

The first run downloads Kyutai's bf16 model from Hugging Face (large: once) and converts
it (8-bit by default) into ~/.cache/moshivis-mlx. Each session is saved (stereo WAV,
transcript with gate values, latency trace) under ./moshivis-sessions/ unless --no-record.
"""




def device_arg(spec: str) -> int | str | None:
    """--input-device / --output-device: a device number or part of its name."""
    if spec.strip() == "":
        return None
    return int(spec) if spec.strip().isdigit() else spec


def build_parser() -> argparse.ArgumentParser:
    from moshivis_mlx.cli.options import add_answer_end, add_bundle_options

    from moshivis_mlx.stream import CODEC_DEVICES

    p = argparse.ArgumentParser(prog="moshivis-mlx", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    img = p.add_mutually_exclusive_group()
    img.add_argument("--image", metavar="PATH",
                     help="the picture to talk about (JPEG, PNG, ...; press i to change it)")
    img.add_argument("--no-image", action="store_true",
                     help="plain Moshi: no image encoder is loaded, no image is used")
    img.add_argument("--camera", metavar="DEVICE", nargs="?", const="",
                     help="live mode: the image is a webcam snapshot (default: the first "
                          "camera; a number, a device path, or a video file); press c for a "
                          "new one (needs pip install 'moshivis-mlx[camera]')")

    w = p.add_argument_group("model")
    add_bundle_options(w)
    w.add_argument("--codec-device", choices=CODEC_DEVICES, default="default",
                   help="where the Mimi codec runs: with the model (default), on the CPU "
                        "beside it (cpu), or Kyutai's own Rust Mimi on the CPU (rust, needs "
                        "pip install rustymimi), as Kyutai's clients do; moshivis-bench "
                        "--codec-device tells which is fastest on your Mac")
    w.add_argument("--kv-bits", type=int, choices=(8,),
                   help="keep the attention cache quantized: 8 bits halve its 1.6 GB (the 7B "
                        "model's 3000-position window), which lets -q q4 run on an 8 GB Mac "
                        "(default: full precision)")

    a = p.add_argument_group("audio (live mode)")
    a.add_argument("--list-devices", action="store_true",
                   help="list microphones and speakers, then exit")
    a.add_argument("--input-device", metavar="DEV", type=device_arg,
                   help="microphone: number or part of the name (default: the system's)")
    a.add_argument("--output-device", metavar="DEV", type=device_arg,
                   help="speaker: number or part of the name (default: the system's)")
    a.add_argument("--no-echo-cancel", action="store_true",
                   help="keep the model's own voice in the microphone (echo cancellation is "
                        "on by default, for laptop speakers; with headphones it is not needed)")
    a.add_argument("--camera-every", type=float, metavar="S",
                   help="with --camera: a new snapshot every S seconds (default: only on c)")
    a.add_argument("--record", metavar="DIR",
                   help="save the session here (default: ./moshivis-sessions/<date-time>/); "
                        "with --serve, each conversation in a new folder under DIR (served "
                        "conversations are recorded only then)")
    a.add_argument("--no-record", action="store_true", help="do not save the session")

    f = p.add_argument_group("file mode (no audio devices)")
    f.add_argument("--input-wav", metavar="IN.wav",
                   help="the user's side of the conversation (any rate, any channels)")
    f.add_argument("--output-wav", metavar="OUT.wav", help="the model's side, 24 kHz mono")
    f.add_argument("--transcript", metavar="T.json",
                   help="also write the model's words with times and gate values")
    add_answer_end(f)
    f.add_argument("--same-length", action="store_true",
                   help="stop when the question ends: the answer is exactly as long, frame "
                        "i of it what the model said while frame i was heard")
    f.add_argument("--demo", action="store_true",
                   help="offline demo: a tiny random model (made on first use) answers a "
                        "sample question about a sample picture; the answer is noise")

    v = p.add_argument_group("server (Kyutai's websocket protocol; see docs/SERVE.md)")
    v.add_argument("--serve", action="store_true",
                   help="serve the model at /api/chat to Kyutai's clients and our web page "
                        "at / (with --demo: the tiny random model)")
    v.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; any "
                        "other needs TLS and the access token the printed URL carries)")
    v.add_argument("--port", type=int, default=8998, help="port (default 8998; 0: any free)")
    v.add_argument("--static", metavar="DIR",
                   help="serve this web client at / instead of ours (e.g. Kyutai's built one)")
    v.add_argument("--ssl-cert", metavar="PEM", help="TLS certificate (with --ssl-key; "
                   "default off the loopback: a self-signed one made on first use)")
    v.add_argument("--ssl-key", metavar="PEM", help="the certificate's private key")
    v.add_argument("--no-tls", action="store_true",
                   help="plain http/ws (loopback only: behind a proxy that adds TLS)")
    v.add_argument("--token", metavar="TOKEN",
                   help="the access token clients must give (default: a random one when "
                        "the host is not loopback; none on loopback)")
    v.add_argument("--idle-timeout", type=float, default=30.0, metavar="S",
                   help="end a connection after S seconds without a message (default 30)")

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
    if args.serve:
        for flag, given in (("--input-wav", args.input_wav), ("--camera", args.camera),
                            ("--list-devices", args.list_devices)):
            if given:
                p.error(f"--serve does not go with {flag}")
        if not 0 <= args.port <= 65535:
            p.error(f"--port must be in [0, 65535], got {args.port}")
        if not 1 <= args.idle_timeout <= 86400:
            p.error(f"--idle-timeout must be in [1, 86400], got {args.idle_timeout}")
        if args.token is not None and not 8 <= len(args.token) <= 256:
            p.error("--token must be 8 to 256 characters")
    else:
        for flag, given in (("--static", args.static), ("--ssl-cert", args.ssl_cert),
                            ("--ssl-key", args.ssl_key), ("--no-tls", args.no_tls),
                            ("--token", args.token)):
            if given:
                p.error(f"{flag} is for --serve")
    if args.record and args.no_record:
        p.error("--record and --no-record contradict each other")
    if args.camera is not None and (args.input_wav or args.demo):
        p.error("--camera is for live mode (not with --input-wav or --demo)")
    if args.camera_every is not None and (args.camera is None
                                          or not 0 < args.camera_every <= 3600):
        p.error("--camera-every needs --camera and a number of seconds in (0, 3600]")
    # Bounds as a bundle's config is checked (GenerationConfig).
    from moshivis_mlx.cli.options import answer_end_error

    from moshivis_mlx.errors import UsageError, check_option
    from moshivis_mlx.sampling import MAX_SEED

    try:
        for flag, v, lo, hi in (("--text-temperature", args.text_temperature, 0, 100),
                                ("--audio-temperature", args.audio_temperature, 0, 100),
                                ("--top-k", args.top_k, 0, 1 << 20),
                                ("--top-p", args.top_p, 0, 1),
                                ("--xa-start", args.xa_start, 0, 1 << 30),
                                ("--seed", args.seed, 0, MAX_SEED)):
            check_option(flag, v, lo, hi)
    except UsageError as e:
        p.error(e.message)
    if error := answer_end_error(args):
        p.error(error)


def options_from(args: argparse.Namespace) -> AppOptions:
    """The parsed command line as the app's typed options (the only place that reads it)."""
    from moshivis_mlx.cli.options import bundle_options

    from moshivis_mlx.app.options import AppOptions, ModelOptions, ServeOptions

    model = ModelOptions(
        bundle=bundle_options(args), text_temperature=args.text_temperature,
        audio_temperature=args.audio_temperature, top_k=args.top_k, top_p=args.top_p,
        xa_start=args.xa_start, seed=args.seed, codec_device=args.codec_device,
        kv_bits=args.kv_bits)
    return AppOptions(
        model=model, image=args.image, no_image=args.no_image,
        input_device=args.input_device, output_device=args.output_device,
        echo_cancel=not args.no_echo_cancel, camera=args.camera,
        camera_every=args.camera_every,
        # Served conversations are recorded only when asked (--record DIR).
        record=bool(args.record) if args.serve else not args.no_record,
        record_dir=Path(args.record) if args.record else None,
        input_wav=args.input_wav, output_wav=Path(args.output_wav) if args.output_wav else None,
        transcript=Path(args.transcript) if args.transcript else None,
        same_length=args.same_length, answer_silence=args.answer_silence,
        max_answer_seconds=args.max_answer_seconds,
        demo=args.demo, list_devices=args.list_devices, debug=args.debug,
        serve=ServeOptions(
            host=args.host, port=args.port, static=Path(args.static) if args.static else None,
            ssl_cert=Path(args.ssl_cert) if args.ssl_cert else None,
            ssl_key=Path(args.ssl_key) if args.ssl_key else None, no_tls=args.no_tls,
            token=args.token, idle_timeout=args.idle_timeout) if args.serve else None)


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    check_args(p, args)
    from moshivis_mlx.app.main import run_cli

    return run_cli(options_from(args))


if __name__ == "__main__":
    sys.exit(main())
