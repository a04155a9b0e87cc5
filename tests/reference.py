"""Kyutai's PyTorch reference, built at small sizes with random weights, for parity tests.

Only the test suite imports this (torch and moshi are test-only dependencies).
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from moshivis_mlx import Generator, Sampler, load_lm  # noqa: E402

torch.set_num_threads(1)

DELAYS = [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1]


def tiny_lm_kwargs(context: int = 24, **over) -> dict:
    """Kyutai `lm_kwargs` for a tiny Moshi with the real structure."""
    kw = dict(
        dim=64, text_card=96, existing_text_padding_id=3, n_q=16, dep_q=8, card=64,
        num_heads=4, num_layers=2, hidden_scale=4.5, causal=True, layer_scale=None,
        context=context, max_period=10000, gating="silu", norm="rms_norm_f32",
        positional_embedding="rope", depformer_dim=64, depformer_dim_feedforward=192,
        depformer_num_heads=2, depformer_num_layers=2, depformer_layer_scale=None,
        depformer_multi_linear=True, depformer_context=8, depformer_max_period=10000,
        depformer_gating="silu", depformer_pos_emb="none", depformer_weights_per_step=True,
        delays=list(DELAYS),
    )
    kw.update(over)
    return kw


def build_moshi_lm(lm_kwargs: dict, seed: int = 0):
    """Kyutai's LMModel in float32 with every parameter random (norm gains too)."""
    from moshi.models import loaders

    torch.manual_seed(seed)
    lm = loaders.get_moshi_lm(None, lm_kwargs=lm_kwargs, device="cpu", dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if name.endswith("alpha"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p.shape[-1] if p.dim() > 1 else 1
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in ** 0.5)
    lm.eval()
    return lm


def released_state_dict(lm) -> dict[str, torch.Tensor]:
    """The module's state dict in the layout of Kyutai's released files
    (fused per-step attention weights `in_proj_weight` / `out_proj.weight`)."""
    sd = {k: v.detach().clone().contiguous() for k, v in lm.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    groups: dict[str, dict[int, torch.Tensor]] = {}
    for k, v in sd.items():
        for src, dst in (("in_projs.", "in_proj_weight"), ("out_projs.", "out_proj.weight")):
            if f".{src}" in k and k.endswith(".weight"):
                head, rest = k.split(f".{src}")
                i = int(rest.split(".")[0])
                groups.setdefault(f"{head}.{dst}", {})[i] = v
                break
        else:
            out[k] = v
    for k, parts in groups.items():
        out[k] = torch.cat([parts[i] for i in sorted(parts)], dim=0).contiguous()
    return out


def save_released(lm, path: Path, prefix_map: dict[str, str] | None = None) -> Path:
    sd = released_state_dict(lm)
    if prefix_map:
        sd = {_rename(k, prefix_map): v for k, v in sd.items()}
    save_file(sd, str(path))
    return path


def _rename(k: str, prefix_map: dict[str, str]) -> str:
    for a, b in prefix_map.items():
        if k.startswith(a):
            return b + k[len(a):]
    return k


class ReferenceRun:
    """Greedy streaming run of Kyutai's LMGen, recording tokens and logits per step."""

    def __init__(self, lm):
        from moshi.models import LMGen

        self.lm = lm
        self.gen = LMGen(lm, use_sampling=False, temp=0, temp_text=0, top_k=0, top_k_text=0,
                         check=True)
        self.text_logits: list[np.ndarray] = []
        self.audio_logits: list[np.ndarray] = []
        self.gen.on_text_logits_hook = lambda logits: self.text_logits.append(
            logits.detach().float().numpy().reshape(-1))
        original = lm.forward_depformer
        self._step_audio: list[np.ndarray] = []

        def recording(cb_index, sequence, transformer_out):
            logits = original(cb_index, sequence, transformer_out)
            self._step_audio.append(logits.detach().float().numpy().reshape(-1))
            if cb_index == lm.dep_q - 1:
                self.audio_logits.append(np.stack(self._step_audio))
                self._step_audio = []
            return logits

        lm.forward_depformer = recording

    def run(self, user_codes: np.ndarray) -> list[np.ndarray | None]:
        """user_codes [8, T] -> per step the [9] output column (None at step 0)."""
        outs = []
        with torch.no_grad(), self.gen.streaming(1):
            for t in range(user_codes.shape[1]):
                codes = torch.from_numpy(user_codes[None, :, t: t + 1].astype(np.int64))
                out = self.gen.step(codes)
                outs.append(None if out is None else out[0, :, 0].numpy().copy())
        return outs


# -- comparing our generator with the reference ---------------------------------------

LOGIT_TOL = 1e-4
"""Largest logit difference allowed between our LM and Kyutai's (float32)."""


def greedy_generator(bundle, **kw):
    return Generator(load_lm(bundle), text_sampler=Sampler(temperature=0.0),
                     audio_sampler=Sampler(temperature=0.0), keep_logits=True, **kw)


def compare(pt_lm, gen, steps, seed=1):
    """Runs both for `steps` frames of random user codes; returns the worst logit errors."""
    card = pt_lm.card
    codes = np.random.default_rng(seed).integers(0, card, size=(8, steps))
    ref = ReferenceRun(pt_lm)
    ref_out = ref.run(codes)
    worst_text = worst_audio = 0.0
    for t in range(steps):
        out = gen.step(codes[:, t])
        if t == 0:
            assert out is None and ref_out[0] is None
        else:
            mine = np.array([out.text_token, *out.audio_codes])
            np.testing.assert_array_equal(mine, ref_out[t], err_msg=f"tokens differ at step {t}")
        worst_text = max(worst_text, float(np.abs(np.array(gen.last_text_logits)
                                                  - ref.text_logits[t]).max()))
        worst_audio = max(worst_audio, float(np.abs(np.array(gen.last_audio_logits)
                                                    - ref.audio_logits[t]).max()))
    return worst_text, worst_audio
