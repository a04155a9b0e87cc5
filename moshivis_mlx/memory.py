"""Keeping the weights resident, as mlx-lm does.

On a Mac, Metal may page a large model's buffers out between two uses; for a step every
80 ms that shows as stalls. Raising the wired limit to the device's recommended working
set keeps them in memory. Backends that report no recommended size (the CPU, CUDA) are
left as they are.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten


def weight_bytes(*models: nn.Module | None) -> int:
    """Bytes of every array the models hold (None entries are skipped)."""
    return sum(v.nbytes for m in models if m is not None
               for _, v in tree_flatten(m.parameters()) if isinstance(v, mx.array))


def wire_weights(*models: nn.Module | None) -> str | None:
    """Raise the wired limit to the device's recommended working set (once per process
    is enough: the limit is the process's). Returns a warning when the weights come close
    to that size (the model will run, slowly), else None."""
    recommended = mx.device_info().get("max_recommended_working_set_size")
    if not recommended:
        return None
    mx.set_wired_limit(int(recommended))
    used = weight_bytes(*models)
    if used > 0.9 * recommended:
        return (f"the weights take {used / 1e9:.1f} GB, close to the {recommended / 1e9:.1f} GB "
                "this GPU can keep resident: steps may be slow (try a smaller quantization, "
                "-q q4)")
    return None
