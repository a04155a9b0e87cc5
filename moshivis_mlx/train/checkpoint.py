"""A run's checkpoints: enough to continue exactly where it stopped.

    OUT/checkpoints/step-00000200/
        adapters.safetensors, adapter_config.json   the adapters (a usable set as is)
        optimizer.safetensors                       AdamW's moments, step and rate
        state.json                                  the step and the run's settings

A checkpoint is written into a temporary directory renamed into place, so a run killed
while saving leaves the previous one intact (`sweep` removes what such a kill left, under
the run's lock); a write that fails (a full disk) removes it and stops the run with one
line. A checkpoint whose values are not finite is never written, so the older ones it
would have pruned stay; only the newest `keep` are kept. Resuming validates the
checkpoint (its state, its adapters as `read_adapters` does, the optimizer's moments:
their shapes, finite), loads it and replays the data order up to that step
(`batches.Order`), so the resumed run computes what the uninterrupted one would have.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map_with_path

from ..adapters import (
    AdapterError,
    check_values,
    read_adapters,
    save_safetensors_atomic,
    write_adapters,
)
from ..errors import WeightsError
from ..fileio import atomic_write
from ..models.lm import LmConfig
from ..signals import shielded

CHECKPOINTS = "checkpoints"
OPTIMIZER = "optimizer.safetensors"
STATE = "state.json"
STEP_DIR = re.compile(r"step-(\d{8})$")
PARTIAL_FILE = re.compile(r"\..+\.(\d+)\.partial\.safetensors$")
"""`save_safetensors_atomic`'s temporary file (the pid of its writer in the name)."""
OUR_PARTIAL = re.compile(r"\.(adapters|optimizer)\.\d+\.partial\.safetensors$")
OUR_TMP = re.compile(r"\.(run\.json|adapter_config\.json|state\.json)\.[^.]+\.tmp$")
"""The temporary files of what a run writes in OUT (`save_safetensors_atomic`'s and
`atomic_write`'s): only these are swept there, never a file of the user's."""


class CheckpointError(WeightsError):
    """A checkpoint that cannot be resumed from, or written; the message says which."""


def _resume_fix(path: Path) -> str:
    return (f"remove {path} to resume from the checkpoint before it, or train again into "
            f"another --out")


def checkpoint_dirs(out: Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first."""
    root = Path(out) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / STATE).is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name)[1]))


def latest(out: Path) -> Path | None:
    found = checkpoint_dirs(out)
    return found[-1] if found else None


def write_failed(path: Path, e: BaseException) -> CheckpointError:
    """A failed write as one line and what to do: a full disk (MLX's writer says only
    "[write] Unable to write ...", with no errno), or something in the way."""
    code = getattr(e, "errno", None)
    why = (e.strerror if isinstance(e, OSError) and e.strerror else " ".join(str(e).split()))
    if code in (errno.ENOSPC, errno.EDQUOT) or (code is None and "Unable to write" in why):
        return CheckpointError(f"cannot write {path}: {why}"
                               + (" (is the disk full?)" if code is None else ""),
                               "free some space (or move --out to a larger disk) and "
                               "continue with --resume")
    return CheckpointError(f"cannot write {path}: {why}",
                           "make it writable (or move what is in the way) and continue with "
                           "--resume")


def save(out: Path, step: int, adapters: dict[str, mx.array], optimizer: optim.Optimizer,
         cfg: LmConfig, state: dict[str, Any], keep: int = 2) -> Path:
    """Writes the checkpoint of `step` and prunes all but the newest `keep`. Values that
    are not finite are refused before anything is written or pruned."""
    root = Path(out) / CHECKPOINTS
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.partial"
    moments = dict(tree_flatten(optimizer.state))
    check_values(adapters, f"step {step}: the adapters")
    check_finite_state(moments, f"step {step}: the optimizer's state")
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        write_adapters(tmp, adapters, cfg, {"step": step, **state.get("summary", {})})
        save_safetensors_atomic(tmp / OPTIMIZER, moments)
        atomic_write(tmp / STATE, json.dumps({"step": step, **state}, indent=2) + "\n")
        with shielded():
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
    except BaseException as e:
        with shielded():
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (OSError, RuntimeError)):
            raise write_failed(final, e) from None
        raise
    for old in checkpoint_dirs(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def check_finite_state(arrays: dict[str, mx.array], where: str) -> None:
    """The optimizer's float arrays are finite (an infinite moment resumes into NaN)."""
    from ..bundle import listing, non_finite

    if bad := non_finite(arrays):
        raise CheckpointError(f"{where}: NaN or infinite values in {listing(sorted(bad), 3)}")


def sweep(out: Path, cache: Path | None = None) -> list[Path]:
    """Removes what a killed run left in `out` (call it holding the run's lock): the
    temporary checkpoint directories, and the half-written files of OUT/adapters, of
    run.json and of the checkpoints; in `cache` (which runs may share), the half-written
    files whose writer is no longer running. Returns what was removed."""
    out = Path(out)
    removed: list[Path] = []
    places = [out, out / "adapters", out / CHECKPOINTS, *checkpoint_dirs(out)]
    for place in places:
        if not place.is_dir():
            continue
        for p in place.iterdir():
            temporary = (place.name == CHECKPOINTS and p.name.startswith(".step-")
                         and p.name.endswith(".partial"))
            if temporary or OUR_PARTIAL.match(p.name) or OUR_TMP.match(p.name):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed.append(p)
    for place in (Path(cache) / "images", Path(cache) / "audio") if cache else ():
        if not place.is_dir():
            continue
        for p in place.iterdir():
            m = PARTIAL_FILE.match(p.name)
            if m and not _running(int(m[1])):
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def load_state(path: Path) -> dict[str, Any]:
    """A checkpoint's state.json, checked: an object with its step (the directory's) and
    the run's settings."""
    from ..safetensors import read_json

    path = Path(path)
    try:
        state = read_json(path / STATE, "a checkpoint's state")
    except WeightsError as e:
        raise CheckpointError(str(e), _resume_fix(path)) from None
    step, settings = state.get("step"), state.get("settings")
    m = STEP_DIR.match(path.name)
    if isinstance(step, bool) or not isinstance(step, int) or (m and step != int(m[1])):
        raise CheckpointError(f"{path}/{STATE}: \"step\" is {step!r}, expected "
                              f"{int(m[1]) if m else 'a step number'}", _resume_fix(path))
    if not isinstance(settings, dict):
        raise CheckpointError(f"{path}/{STATE}: \"settings\" is {type(settings).__name__}, "
                              f"expected the run's settings (an object)", _resume_fix(path))
    summary = state.get("summary", {})
    if not isinstance(summary, dict):
        raise CheckpointError(f"{path}/{STATE}: \"summary\" is {type(summary).__name__}, "
                              f"expected an object", _resume_fix(path))
    return state


def restore(path: Path, optimizer: optim.Optimizer, params: dict) -> dict[str, mx.array]:
    """The checkpoint's adapters (by name), with `optimizer` given its saved state
    (initialised for `params` first, so its structure is the model's). Everything is
    validated first: a damaged checkpoint is refused in one line naming its file."""
    from ..safetensors import read_header

    path = Path(path)
    try:
        adapters = read_adapters(path, "checkpoint")
    except AdapterError as e:
        raise CheckpointError(e.message, _resume_fix(path)) from None
    opt_path = path / OPTIMIZER
    if not opt_path.is_file():
        raise CheckpointError(f"{path}: incomplete checkpoint (no {OPTIMIZER})",
                              _resume_fix(path))
    try:
        table = read_header(opt_path)
        saved = mx.load(str(opt_path))
    except WeightsError as e:
        raise CheckpointError(e.message, _resume_fix(path)) from None
    except Exception as e:  # MLX raises RuntimeError / ValueError for a broken file
        raise CheckpointError(f"{opt_path}: not a readable safetensors file ({e})",
                              _resume_fix(path)) from None
    optimizer.init(params)
    want = dict(tree_flatten(optimizer.state))
    missing = [k for k in want if k not in saved]
    if missing:
        raise CheckpointError(f"{opt_path}: no state for {', '.join(missing[:3])}",
                              "the checkpoint was made for other adapters")
    wrong = [f"{k} {list(table[k].shape)} (expected {list(v.shape)})" for k, v in want.items()
             if tuple(table[k].shape) != tuple(v.shape)]
    if wrong:
        raise CheckpointError(f"{opt_path}: mis-shaped state: {', '.join(wrong[:3])}",
                              _resume_fix(path))
    try:
        check_finite_state(saved, str(opt_path))
    except CheckpointError as e:
        raise CheckpointError(e.message, _resume_fix(path)) from None
    optimizer.state = tree_map_with_path(lambda k, v: saved[k].astype(v.dtype), optimizer.state)
    optimizer.init(params)  # marks it initialised; the values just set are kept
    return adapters.weights
