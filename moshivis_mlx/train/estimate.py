"""What a full-size adapter step costs, computed from the model's shapes: the memory of
the weights, of the trained adapters and their optimizer state, and of the activations
kept for the backward pass; and the floating-point work, turned into seconds for a few
Apple GPUs at an assumed sustained rate. `moshivis-train --estimate` prints it; the same
accounting is checked against the peak memory MLX measures on small models
(tests/test_train_estimate.py).

Memory, in bytes (a = the backbone's activation dtype, 2 for bfloat16; T = frames, B =
batch, d = width, h = FFN width, N = image tokens, H = heads, L = layers):

* frozen backbone: its stored size (q8: 8 bits a weight + a bfloat16 scale and bias per
  group of 64 = 1.0625 bytes; norms bfloat16), the adapters excluded;
* adapters, trained in float32: weights 4 + gradients 4 + AdamW's two moments 8 = 16
  bytes a parameter;
* activations kept for the backward pass. One layer keeps about
  (24 a + 25) B T d (its normed inputs, q, k, v, the outputs of attention, of the
  cross-attention in float32, of the gate, the FFN's hidden 2h + h + h), plus the
  attention probabilities 2 * 4 B H T (T + N). With gradient checkpointing only each
  layer's input (a B T d) is kept, and one layer at a time is recomputed: twice that
  layer's share (its activations and their gradients);
* outside the layers: the image's projected tokens, keys and values and their gradients
  (8 * 4 B N d), the text logits in float32 with their softmax and gradient (3 * 4 B T
  32000), the depth transformer over the scored codebooks, the 17 embeddings.

Work: 2 multiply-adds per weight per token forward; backward, the frozen layers need
only the gradient of their input (as much work again), the adapters that of their
weights too (twice); checkpointing recomputes the temporal transformer's forward once.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..adapters import is_adapter
from ..models.lm import LM, LmConfig, moshivis_7b
from ..models.mimi import MimiConfig
from ..quant import QuantSpec, preset, preset_name, quantizable

SUSTAINED = 0.4
"""Fraction of a GPU's peak bfloat16 rate assumed sustained by a training step (large
matrix products at a few hundred tokens, 8-bit weights dequantized on the fly)."""

GPUS = {"M2 Pro (19-core GPU)": 6.8, "M3 Pro (18-core GPU)": 7.4, "M4 Pro (20-core GPU)": 9.2,
        "M2 Max (38-core GPU)": 13.6, "M4 Max (40-core GPU)": 18.4}
"""Peak 16-bit GPU rates in TFLOPS (vendor figures of the base GPU of each chip)."""


@dataclass
class Estimate:
    backbone_bytes: float
    adapter_params: int
    adapter_bytes: float
    activation_bytes: float
    outside_bytes: float
    flops: float

    @property
    def total_bytes(self) -> float:
        return self.backbone_bytes + self.adapter_bytes + self.activation_bytes + \
            self.outside_bytes


def _param_bytes(lm: LM, quant: QuantSpec | None, act: int) -> tuple[float, int]:
    """(stored bytes of the frozen backbone, number of adapter parameters)."""
    frozen, adapters = 0.0, 0
    for path, module in lm.named_modules():
        own = {k: v for k, v in module.items() if hasattr(v, "shape")}
        for name, p in own.items():
            full = f"{path}.{name}" if path else name
            if is_adapter(full):
                adapters += p.size
            elif quant is not None and name == "weight" and quantizable(module, quant.group_size):
                frozen += p.size * quant.bits / 8 + 2 * act * p.size / quant.group_size
            else:
                frozen += p.size * act
    return frozen, adapters


Q8 = preset("q8")


def estimate(cfg: LmConfig | None = None, quant: QuantSpec | None = Q8,
             batch: int = 1, frames: int = 375, audio_codebooks: int = 2,
             image_tokens: int = 1024, grad_checkpoint: bool = True,
             activation_bytes: int = 2) -> Estimate:
    cfg = cfg or moshivis_7b()
    a = activation_bytes
    b, t, d, h, n, heads = batch, frames, cfg.dim, cfg.ffn_hidden, image_tokens, cfg.num_heads
    lm = LM(cfg)  # lazily initialised: nothing is allocated
    backbone, p_adapters = _param_bytes(lm, quant, a)
    adapters = 16.0 * p_adapters

    btd = b * t * d
    probs = 4 * b * heads * t * (min(t, cfg.context) + n)
    per_layer = ((13 + 4 * h / d) * a + 25) * btd + 2 * probs
    if grad_checkpoint:
        # Measured (tests/test_train_estimate.py): besides its input, each checkpointed
        # layer still holds about its two sets of attention probabilities (self and
        # cross) until the backward pass reaches it.
        activations = cfg.num_layers * (a * btd + 2 * probs) + 2 * per_layer
    else:
        activations = cfg.num_layers * per_layer

    dd = cfg.depformer
    k = audio_codebooks
    dep_layer = ((7 + 3 + 4 * dd.ffn_hidden / dd.dim) * a) * b * t * k * dd.dim \
        + 2 * 4 * b * t * dd.num_heads * k * k
    outside = (8 * 4 * b * n * d                      # image prefix, keys, values, gradients
               + 3 * 4 * b * t * cfg.text_card        # text logits, softmax, gradient
               + 3 * 4 * b * t * k * cfg.card         # audio logits
               + (dd.num_layers * dep_layer if k else 0)
               + (1 + cfg.n_q) * a * btd              # the embeddings summed
               + 4 * 4 * btd)                         # gradients flowing down the stack

    # Work: weights of the temporal stack, the cross-attention, the gates, the heads.
    tokens = b * t
    attn_ffn = cfg.num_layers * (4 * d * d + 3 * d * h)
    xa_q_out = cfg.num_layers * 2 * d * d
    gates = cfg.num_layers * 2 * d * cfg.xa_gate_hidden
    dep_params = dd.num_layers * (4 * dd.dim ** 2 + 3 * dd.dim * dd.ffn_hidden) + d * dd.dim
    forward = 2 * tokens * (attn_ffn + xa_q_out + gates + d * cfg.text_card) \
        + 2 * tokens * k * dep_params \
        + 2 * b * n * (cfg.image_dim * d + 2 * d * d) \
        + cfg.num_layers * 4 * b * t * d * (min(t, cfg.context) + n)
    adapter_forward = 2 * tokens * (xa_q_out + gates) + 2 * b * n * (cfg.image_dim * d + 2 * d * d)
    backward = forward + adapter_forward
    recompute = 2 * tokens * (attn_ffn + xa_q_out + gates) \
        + cfg.num_layers * 4 * b * t * d * (min(t, cfg.context) + n) if grad_checkpoint else 0
    return Estimate(backbone, p_adapters, adapters, activations, outside,
                    forward + backward + recompute)


def estimate_report(quantize: str = "q8", batch: int = 1, seconds: float = 30.0,
                    audio_codebooks: int = 2, grad_checkpoint: bool = True) -> str:
    quant = preset(quantize)
    frames = round(seconds * MimiConfig().frame_rate)
    e = estimate(quant=quant, batch=batch, frames=frames, audio_codebooks=audio_codebooks,
                 grad_checkpoint=grad_checkpoint)
    gb = 1e9
    rows = [("frozen backbone", e.backbone_bytes),
            (f"adapters, {e.adapter_params / 1e6:.0f}M x 16 B (float32 weights, gradients, "
             f"AdamW moments)", e.adapter_bytes),
            ("activations of the 32 layers", e.activation_bytes),
            ("image tokens, logits, depth transformer, embeddings", e.outside_bytes),
            ("total", e.total_bytes)]
    lines = [f"MoshiVis 7B adapter step: backbone {preset_name(quant)} (frozen), batch {batch}, "
             f"{seconds:g} s samples ({frames} frames), {audio_codebooks} audio codebooks "
             f"scored, gradient checkpointing {'on' if grad_checkpoint else 'off'}"]
    lines += [f"  {label:<72s} {value / gb:6.2f} GB" for label, value in rows]
    lines += ["  (plus MLX's allocator cache; macOS lets the GPU use about 70% of a Mac's "
              "memory: ~22 GB of 32 GB)",
              f"  work: {e.flops / 1e12:.1f} TFLOP a step; at {SUSTAINED:.0%} of the peak "
              f"16-bit rate:"]
    for name, tflops in GPUS.items():
        lines.append(f"    {name:24s} {e.flops / (SUSTAINED * tflops * 1e12):5.1f} s a step")
    return "\n".join(lines)
