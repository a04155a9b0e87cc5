"""Runs a parsed command line; turns every failure into one line and an exit code."""

from __future__ import annotations

import argparse
import sys

from rich.console import Console

from ..errors import EXIT_ERROR, EXIT_INTERRUPTED, MoshivisError

PROG = "moshivis-mlx"


def run(args: argparse.Namespace, console: Console) -> int:
    if args.list_devices:
        from .audio import list_devices

        print(list_devices())
        return 0
    if args.demo:
        from .demo import run_demo

        return run_demo(args, console)
    if args.input_wav:
        from .files import run_file

        return run_file(args, console)
    from .live import run_live

    return run_live(args, console)


def error_line(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)


def run_cli(args: argparse.Namespace) -> int:
    """`run` with the app's error policy: a one-line message and a non-zero exit code,
    a traceback only with --debug."""
    console = Console(highlight=False, soft_wrap=True)
    try:
        return run(args, console)
    except MoshivisError as e:
        if args.debug:
            raise
        error_line(str(e))
        return e.exit_code
    except KeyboardInterrupt:
        if args.debug:
            raise
        error_line("interrupted")
        return EXIT_INTERRUPTED
    except Exception as e:  # a bug: say so briefly, the traceback is one flag away
        if args.debug:
            raise
        text = " ".join(str(e).split())[:300]
        error_line(f"unexpected {type(e).__name__}: {text} (run again with --debug for "
                   f"the traceback, and please report it)")
        return EXIT_ERROR
