"""The full-size presets map 1:1 onto the released checkpoints (names and shapes only).

MLX builds modules lazily: the 7B skeleton's parameter shapes are known without allocating
a byte of weights, and the manifests give the released files' names and shapes.
"""

from __future__ import annotations

import pytest
from mlx.utils import tree_flatten
from moshivis_mlx.weights_convert.convert import Quantization, expected_lm_tensors
from moshivis_mlx.weights_convert.lm_layout import (
    check_mapping,
    detect_lm_layout,
    infer_lm_config,
    lm_mapping,
)
from moshivis_mlx.weights_convert.safetensors_io import WeightsError
from synthetic import manifest, manifest_shapes

from moshivis_mlx import LM
from moshivis_mlx.models.lm import moshi_7b, moshivis_7b

CASES = {
    "moshi_7b_lm.pt.json": (moshi_7b, "moshi-pytorch"),
    "moshivis.pt.json": (moshivis_7b, "moshivis-pytorch"),
}


def lm_part(name: str) -> dict[str, tuple[int, ...]]:
    return {k: v for k, v in manifest_shapes(name).items() if not k.startswith("image_prefix.enc.")}


@pytest.mark.parametrize("name", sorted(CASES))
def test_preset_maps_one_to_one(name):
    preset, layout = CASES[name]
    shapes = lm_part(name)
    assert detect_lm_layout(shapes) == layout
    cfg = infer_lm_config(shapes, layout)
    assert cfg == preset()
    mapping = lm_mapping(shapes, layout, cfg)
    check_mapping(mapping, shapes, name)  # nothing missing, nothing left over, shapes agree

    ours = {k: tuple(v.shape) for k, v in tree_flatten(LM(cfg).parameters())}
    mapped = {e.dst: e.shape for e in mapping.entries}
    assert mapped == ours
    used = {e.src for e in mapping.entries} | set(mapping.ignored)
    assert used == set(shapes)


def test_kyutai_config_is_honoured_and_checked():
    shapes = lm_part("moshi_7b_lm.pt.json")
    kwargs = manifest("moshi_7b_lm.pt.json")["lm_kwargs"]
    assert infer_lm_config(shapes, "moshi-pytorch", kwargs) == moshi_7b()
    with pytest.raises(WeightsError, match="num_layers"):
        infer_lm_config(shapes, "moshi-pytorch", {**kwargs, "num_layers": 30})


def test_missing_and_extra_tensors_are_listed():
    shapes = lm_part("moshi_7b_lm.pt.json")
    cfg = infer_lm_config(shapes, "moshi-pytorch")
    broken = dict(shapes)
    del broken["transformer.layers.3.norm2.alpha"]
    broken["transformer.layers.3.surprise"] = (4,)
    broken["out_norm.alpha"] = (1, 1, 8)
    with pytest.raises(WeightsError) as e:
        check_mapping(lm_mapping(broken, "moshi-pytorch", cfg), broken, "x.safetensors")
    msg = str(e.value)
    assert "missing tensors: transformer.layers.3.norm2.alpha" in msg
    assert "unexpected tensors: transformer.layers.3.surprise" in msg
    assert "mis-shaped tensors: out_norm.alpha" in msg


@pytest.mark.parametrize("bits,group", [(8, 64), (4, 32)])
def test_quantized_7b_skeleton_shapes(bits, group):
    """A q8/q4 bundle's names and shapes, from the skeleton alone: every linear and
    embedding of the 7B model is quantizable at these group sizes; norms stay float."""
    tensors = expected_lm_tensors(moshivis_7b(), Quantization(bits, group))
    assert tensors["text_linear.weight"] == (32000, 4096 * bits // 32)
    assert tensors["text_linear.scales"] == (32000, 4096 // group)
    assert tensors["out_norm.weight"] == (4096,)
    assert not any(k.startswith("out_norm.") and k.endswith("scales") for k in tensors)

