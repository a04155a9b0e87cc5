"""Errors the user can fix: one line saying what happened and what to do, and an exit code.

The entry point prints `moshivis-mlx: error: <message>` and exits with `exit_code`; a
traceback is shown only with --debug.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_AUDIO_DEVICE = 3
EXIT_WEIGHTS = 4
EXIT_IMAGE = 5
EXIT_AUDIO_FILE = 6
EXIT_INTERRUPTED = 130


class AppError(Exception):
    """A failure with a one-line explanation and its fix."""

    exit_code = EXIT_ERROR

    def __init__(self, message: str, fix: str | None = None):
        super().__init__(message)
        self.message = " ".join(message.split())
        self.fix = " ".join(fix.split()) if fix else None

    def __str__(self) -> str:
        return f"{self.message}; {self.fix}" if self.fix else self.message


class AudioDeviceError(AppError):
    exit_code = EXIT_AUDIO_DEVICE


class WeightsError(AppError):
    exit_code = EXIT_WEIGHTS


class ImageInputError(AppError):
    exit_code = EXIT_IMAGE


class AudioFileInputError(AppError):
    exit_code = EXIT_AUDIO_FILE
