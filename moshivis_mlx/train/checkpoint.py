"""A run's checkpoints: enough to continue exactly where it stopped.

    OUT/checkpoints/step-00000200/
        adapters.safetensors, adapter_config.json   the adapters (a usable set as is)
        optimizer.safetensors                       AdamW's moments, step and rate
        state.json                                  the step and the run's settings

A checkpoint is written into a temporary directory renamed into place, so a run killed
while saving leaves the previous one intact; only the newest `keep` are kept. Resuming
loads the adapters and the optimizer state and replays the data order up to that step
(`batches.Order`), so the resumed run computes what the uninterrupted one would have.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map_with_path

from ..adapters import (
    ADAPTER_WEIGHTS,
    read_adapters,
    save_safetensors_atomic,
    write_adapters,
)
from ..errors import MoshivisError
from ..fileio import atomic_write
from ..models.lm import LmConfig

CHECKPOINTS = "checkpoints"
OPTIMIZER = "optimizer.safetensors"
STATE = "state.json"
STEP_DIR = re.compile(r"step-(\d{8})$")


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


def save(out: Path, step: int, adapters: dict[str, mx.array], optimizer: optim.Optimizer,
         cfg: LmConfig, state: dict[str, Any], keep: int = 2) -> Path:
    root = Path(out) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    write_adapters(tmp, adapters, cfg, {"step": step, **state.get("summary", {})})
    save_safetensors_atomic(tmp / OPTIMIZER, dict(tree_flatten(optimizer.state)))
    atomic_write(tmp / STATE, json.dumps({"step": step, **state}, indent=2) + "\n")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in checkpoint_dirs(out)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(path) / STATE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MoshivisError(f"{path}/{STATE}: unreadable checkpoint ({e})") from None


def restore(path: Path, optimizer: optim.Optimizer, params: dict) -> dict[str, mx.array]:
    """The checkpoint's adapters (by name), with `optimizer` given its saved state
    (initialised for `params` first, so its structure is the model's)."""
    path = Path(path)
    adapters = read_adapters(path)
    if not (path / ADAPTER_WEIGHTS).is_file() or not (path / OPTIMIZER).is_file():
        raise MoshivisError(f"{path}: incomplete checkpoint")
    saved = mx.load(str(path / OPTIMIZER))
    optimizer.init(params)
    missing = [k for k, _ in tree_flatten(optimizer.state) if k not in saved]
    if missing:
        raise MoshivisError(f"{path}/{OPTIMIZER}: no state for {', '.join(missing[:3])}",
                            "the checkpoint was made for other adapters")
    optimizer.state = tree_map_with_path(lambda k, v: saved[k].astype(v.dtype), optimizer.state)
    optimizer.init(params)  # marks it initialised; the values just set are kept
    return adapters.weights
