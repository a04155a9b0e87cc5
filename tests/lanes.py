"""What tests need beyond the package, and the lanes built on it (tests/conftest.py applies
them; the markers are registered in pyproject.toml).

  slow            a long run; `make test-fast` leaves it out
  system(*tools)  needs system tools (names from TOOLS): skipped, saying which are missing
                  and how to get them, unless CI is set
  torch           needs Kyutai's PyTorch reference (torch, moshi) or transformers: skipped
                  when not installed, unless CI is set

With the environment variable CI set (`.ci/run` sets it) nothing may skip: a skip, whatever
its cause, fails the run with its reason.

Test modules import the reference stack under `if reference_wanted():`, so that they collect
without it (their other tests stay in the fast lane) and a run that deselects every torch
test does not spend seconds importing it.
"""

from __future__ import annotations

import ctypes.util
import functools
import glob
import importlib.util
import itertools
import os
import re
import shutil
import sys
from collections.abc import Callable

import pytest

IN_CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")

REFERENCE_STACK = ("torch", "moshi", "transformers")
"""The test-only packages the tests marked torch import (`make test` installs them)."""


_torch_deselected = False


def deselect(markexpr: str) -> None:
    """Notes the run's `-m` expression (tests/conftest.py, before collection)."""
    global _torch_deselected
    _torch_deselected = _leaves_out_torch(markexpr)


def _leaves_out_torch(markexpr: str) -> bool:
    """Whether `-m markexpr` deselects every test marked torch, whatever its other marks."""
    if not markexpr:
        return False
    try:
        from _pytest.mark.expression import Expression

        expr = Expression.compile(markexpr)
    except Exception:  # pytest's parser moved or refused it: assume the tests are wanted
        return False
    others = sorted(set(re.findall(r"[A-Za-z_]\w*", markexpr)) - {"and", "or", "not", "torch"})
    for marks in itertools.chain.from_iterable(
            itertools.combinations(others, n) for n in range(len(others) + 1)):
        if expr.evaluate(lambda name, /, marks=marks, **kw: name == "torch" or name in marks):
            return False
    return True


def reference_missing() -> list[str]:
    """The missing packages of Kyutai's PyTorch reference (none: it is installed)."""
    return [m for m in REFERENCE_STACK if importlib.util.find_spec(m) is None]


def reference_wanted() -> bool:
    """Whether a test module should import Kyutai's PyTorch reference (torch, moshi,
    transformers) at its top: installed, and not a run that deselects every test marked
    torch, the only ones using it (`make test-fast` does not pay seconds for torch).

        if reference_wanted():
            import torch
    """
    return not _torch_deselected and not reference_missing()


def require_reference() -> None:
    """Skips the calling test unless Kyutai's PyTorch reference is installed."""
    missing = reference_missing()
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
    # libopus, which opuslib (fujielab-moshi-client's codec) loads with ctypes.
    "libopus": lambda: ctypes.util.find_library("opus") is not None,
    # A Java runtime: pycocoevalcap's PTBTokenizer (Stanford CoreNLP) runs on it.
    "java": _commands("java"),
    # The web page's JavaScript modules run under node; the page itself in headless Chromium.
    "node": _commands("node"),
    "chromium": _commands("chromium"),
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
