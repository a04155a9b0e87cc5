"""The model as training sees it: the backbone frozen (quantized or bfloat16, as the bundle
stores it), the adapters float32 and trainable, gradient checkpointing across layers."""

from __future__ import annotations

import mlx.core as mx
from mlx.utils import tree_flatten

from ..adapters import adapter_parameters, dequantize_adapters, require_cross_attention
from ..models.lm import LM


def prepare_for_training(lm: LM, grad_checkpoint: bool = True, where: str = "the bundle"
                         ) -> int:
    """Freezes everything but the adapters, which become float32 (quantized ones are
    dequantized: a quantized bundle stores them quantized like every other layer).
    Returns the number of trainable parameters.

    Gradients still flow through the frozen layers, quantized or not, to reach the
    adapters of earlier layers; the frozen weights get none.
    """
    require_cross_attention(lm.cfg, where)
    dequantize_adapters(lm, mx.float32)
    lm.load_weights([(k, v.astype(mx.float32)) for k, v in adapter_parameters(lm).items()],
                    strict=False)
    lm.freeze()
    lm.xa.unfreeze()
    lm.image_prefix.unfreeze()
    for layer in lm.transformer.layers:
        layer.xa_gate.unfreeze()
        layer.norm_cross.unfreeze()
    lm.transformer.checkpoint = grad_checkpoint
    mx.eval(lm.parameters())
    return sum(v.size for _, v in tree_flatten(lm.trainable_parameters()))


def trained_adapters(lm: LM) -> dict[str, mx.array]:
    """The trainable (adapter) parameters by name."""
    return dict(tree_flatten(lm.trainable_parameters()))
