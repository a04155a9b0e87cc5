"""What tests need beyond the package, and the lanes built on it (tests/conftest.py applies
them; the markers are registered in pyproject.toml).

  slow            a long run; `make test-fast` leaves it out
  system(*tools)  needs system tools (names from TOOLS): skipped, saying which are missing
                  and how to get them, unless CI is set
  torch           needs Kyutai's PyTorch reference (torch, moshi) or transformers: skipped
                  when not installed, unless CI is set

With the environment variable CI set (`.ci/run` sets it) nothing may skip: a skip, whatever
its cause, fails the run with its reason.
"""

from __future__ import annotations

import ctypes.util
import functools
import glob
import importlib.util
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

IN_CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")

REFERENCE_STACK = ("torch", "moshi", "transformers")
"""The test-only packages the tests marked torch import (`make test` installs them)."""


@contextmanager
def reference_imports() -> Iterator[None]:
    """Module-level imports of the reference stack that may be absent (a `make test-fast`
    venv): the module is still collected, and its tests marked torch, the only ones that
    use these names, are deselected or skipped."""
    try:
        yield
    except ModuleNotFoundError as e:
        if e.name not in REFERENCE_STACK:
            raise


def require_reference() -> None:
    """Skips the calling test unless Kyutai's PyTorch reference is installed."""
    missing = [m for m in REFERENCE_STACK if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"needs the PyTorch reference: {', '.join(missing)} not installed "
                    f"(`make test` installs it)")


# -- system tools ---------------------------------------------------------------------------

def _commands(*names: str) -> Callable[[], bool]:
    return lambda: all(shutil.which(n) for n in names)


def _alsa_pulse_plugin() -> bool:
    """ALSA's "pulse" device (libasound2-plugins): how PortAudio reaches PulseAudio on Linux."""
    if not sys.platform.startswith("linux"):
        return True
    return any(glob.glob(f"/usr/lib*/{arch}alsa-lib/libasound_module_pcm_pulse.so")
               for arch in ("", "*/"))


def _portaudio() -> bool:
    # sounddevice's macOS and Windows wheels bring their own copy.
    return (ctypes.util.find_library("portaudio") is not None
            or importlib.util.find_spec("_sounddevice_data") is not None)


TOOLS: dict[str, Callable[[], bool]] = {
    "espeak-ng": _commands("espeak-ng"),
    "sox": _commands("sox"),
    "tmux": _commands("tmux"),
    # The daemon, pactl / parec / paplay (pulseaudio-utils) and ALSA's pulse plugin.
    "pulseaudio": lambda: (_commands("pulseaudio", "pactl", "parec", "paplay")()
                           and _alsa_pulse_plugin()),
    "portaudio": _portaudio,
}


@functools.cache
def _have(tool: str) -> bool:
    if tool not in TOOLS:
        raise ValueError(f"unknown system tool {tool!r} (known: {', '.join(TOOLS)})")
    return TOOLS[tool]()


def missing_tools(*tools: str) -> list[str]:
    return [t for t in tools if not _have(t)]


def require_tools(*tools: str) -> None:
    """Skips the calling test unless every tool is installed."""
    missing = missing_tools(*tools)
    if missing:
        pytest.skip(f"needs system tools: {', '.join(missing)} missing "
                    f"(scripts/install-system-test-deps.sh says how to install them)")
