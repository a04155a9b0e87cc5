"""Errors a user can fix, and the one place they are turned into one line and an exit code.

Every error the project raises for a bad input or environment (a missing file, a broken
checkpoint, an unreadable image, a microphone that vanished) is a `MoshivisError`: a
message saying what happened, optionally what to do, always printed on one line. The
entry points run through `guard`, which prints `prog: error: <message>` and returns the
error's exit code; a traceback is shown only with --debug. Anything else is a bug and is
reported as one.

They are not `ValueError`s: a library's ValueError (NumPy's, MLX's) is something to turn
into one of these with its context, and catching one never swallows the other.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from .signals import exit_status, stop_on_signals

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_AUDIO_DEVICE = 3
EXIT_WEIGHTS = 4
EXIT_IMAGE = 5
EXIT_AUDIO_FILE = 6
EXIT_CAMERA = 7
EXIT_INTERRUPTED = 130
"""Ctrl-C; SIGTERM gives 143 and SIGHUP 129 (128 + the signal, see signals.py)."""
MAX_MESSAGE = 1500
"""An error message is cut here: a line, not a page (lists are shortened where made)."""


def one_line(text: object, limit: int | None = None) -> str:
    """`text` (or an exception's message) with its whitespace collapsed to single spaces,
    cut at `limit` characters."""
    s = " ".join(str(text).split())
    if not s and isinstance(text, BaseException):
        s = type(text).__name__
    if limit is not None and len(s) > limit:
        s = s[: limit - 3].rstrip() + "..."
    return s


class MoshivisError(Exception):
    """A failure with a one-line explanation and, where there is one, its fix."""

    exit_code = EXIT_ERROR

    def __init__(self, message: str, fix: str | None = None):
        super().__init__(message)
        self.message = one_line(message, MAX_MESSAGE)
        self.fix = one_line(fix, MAX_MESSAGE) if fix else None

    def __str__(self) -> str:
        return f"{self.message}; {self.fix}" if self.fix else self.message


class UsageError(MoshivisError):
    """Options that contradict each other or cannot be used together."""

    exit_code = EXIT_USAGE


class AudioDeviceError(MoshivisError):
    exit_code = EXIT_AUDIO_DEVICE


class WeightsError(MoshivisError):
    """Weights, checkpoints, bundles, configs and conversions that cannot be used."""

    exit_code = EXIT_WEIGHTS


class BundleError(WeightsError):
    """A bundle directory that cannot be used (the message says what to do)."""


class TokenizerError(WeightsError):
    """No usable text tokenizer (the message says where it is expected)."""


class ImageError(MoshivisError):
    """An image that cannot be used; the message names the file."""

    exit_code = EXIT_IMAGE


class AudioFileError(MoshivisError):
    """An audio file that cannot be used; the message names the file."""

    exit_code = EXIT_AUDIO_FILE


class CameraError(MoshivisError):
    """A camera or video file that cannot be used as the image source (none found, busy,
    access refused, not a video, OpenCV missing)."""

    exit_code = EXIT_CAMERA


def check_option(flag: str, value: float | None, low: float, high: float,
                 open_low: bool = False, unit: str = "") -> None:
    """A `UsageError` unless option `flag`'s `value` is in [low, high] ((low, high] with
    `open_low`; None: not given). Written so that NaN fails every bound; a bool is no
    number."""
    if value is None:
        return
    if not isinstance(value, bool) and (low < value if open_low else low <= value) \
            and value <= high:
        return
    span = f"{'(' if open_low else '['}{_number(low)}, {_number(high)}]"
    raise UsageError(f"{flag} must be in {span}{f' {unit}' if unit else ''}, "
                     f"got {_number(value)}")


def _number(x: float) -> str:
    """A number as a user writes it: whole ones in full (1048576, not 1.04858e+06)."""
    if isinstance(x, int):
        return str(x)
    return str(int(x)) if x.is_integer() and abs(x) < 1e16 else f"{x:g}"


def say(line: str) -> None:
    """A line on stderr; a terminal that is gone (SIGHUP) is no reason to fail."""
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def error_line(prog: str, message: object) -> None:
    say(f"{prog}: error: {one_line(message, 2 * MAX_MESSAGE)}")


def environment_message(e: OSError) -> str:
    """An OSError (disk full, read-only, permission denied, ...) as the user needs it:
    what failed and on which path."""
    what = e.strerror or one_line(e)
    names = [str(n) for n in (e.filename, e.filename2) if n]
    return f"{' -> '.join(names)}: {what}" if names else what


def guard(prog: str, run: Callable[[], int], debug: bool = False,
          exit_code: Callable[[MoshivisError], int] | None = None,
          interrupted: str = "interrupted", internal_exit: int = EXIT_ERROR) -> int:
    """Runs `run()` with the project's error policy and returns the exit status.

    A `MoshivisError` or an `OSError` (the environment: disk full, read-only, a path that
    vanished) is one line on stderr and its exit code (`exit_code(e)` to override); Ctrl-C,
    SIGTERM and SIGHUP (signals.py: they unwind like Ctrl-C, so everything is saved or
    cleaned up) are one line and 128 + the signal; anything else is a bug, said so in one
    line. `debug` re-raises.
    """
    try:
        with stop_on_signals():
            return run()
    except MoshivisError as e:
        if debug:
            raise
        error_line(prog, e)
        return exit_code(e) if exit_code is not None else e.exit_code
    except KeyboardInterrupt as e:
        if debug:
            raise
        say(f"{prog}: {interrupted}")
        return exit_status(e)
    except OSError as e:
        if debug:
            raise
        error_line(prog, environment_message(e))
        return EXIT_ERROR
    except MemoryError:
        if debug:
            raise
        error_line(prog, "out of memory (close other programs, or use a smaller model: -q q4)")
        return EXIT_ERROR
    except Exception as e:  # a bug: say so briefly, the traceback is one flag away
        if debug:
            raise
        error_line(prog, f"internal error: {type(e).__name__}: {one_line(e, 300)} (run again "
                         f"with --debug for the traceback, and please report it)")
        return internal_exit
