"""Runs the app for a command line's options, under the project's error policy."""

from __future__ import annotations

from rich.console import Console

from ..errors import guard
from .options import AppOptions

PROG = "moshivis-mlx"


def run(opts: AppOptions, console: Console) -> int:
    if opts.list_devices:
        from .audio import list_devices

        print(list_devices())
        return 0
    if opts.serve is not None:
        _require_serve_packages()
        from ..serve.run import run_serve

        return run_serve(opts, console)
    if opts.demo:
        from .demo import run_demo

        return run_demo(opts, console)
    if opts.input_wav:
        from .files import run_file

        return run_file(opts, console)
    from .live import run_live

    return run_live(opts, console)


def _require_serve_packages() -> None:
    import importlib.util

    from ..errors import UsageError

    missing = [m for m in ("aiohttp", "sphn", "cryptography")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"--serve needs {', '.join(missing)}, not installed",
                         "pip install 'moshivis-mlx[serve]'")


def run_cli(opts: AppOptions) -> int:
    """`run` with the project's error policy (errors.guard): a one-line message and the
    error's exit code, a traceback only with --debug."""
    console = Console(highlight=False, soft_wrap=True)
    return guard(PROG, lambda: run(opts, console), debug=opts.debug,
                 interrupted="error: interrupted")
