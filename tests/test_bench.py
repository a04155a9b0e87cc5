"""moshivis-bench: the report, the frame scenarios, a bundle's own sizes, the plot, the
comparison (no timing is asserted)."""

from __future__ import annotations

import json
import time

import pytest
from app_support import demo_bundle
from mlx.utils import tree_flatten
from moshivis_mlx.cli.bench import main as bench_main
from PIL import Image

from moshivis_mlx import LM, bench
from moshivis_mlx.errors import UsageError


def tiny_weights_gb(bytes_per_weight: float) -> float:
    """The tiny preset's weights (MLX builds the model lazily: nothing is allocated)."""
    lm = LM(bench.PRESETS["tiny"]())
    return bytes_per_weight * sum(v.size for _, v in tree_flatten(lm.parameters())) / 1e9


@pytest.fixture(scope="module")
def report_path(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    start = time.perf_counter()
    rc = bench_main(["--config", "tiny", "--quant", "bf16", "--steps", "6", "--warmup", "2",
                     "--codec-frames", "3", "--image-encodes", "1",
                     "--json", str(d / "r.json"), "--plot", str(d / "r.png")])
    (d / "run_s").write_text(str(time.perf_counter() - start))  # the whole run, for test_report
    assert rc == 0
    return d / "r.json"


def test_report(report_path):
    r = json.loads(report_path.read_text())
    assert r["tool"] == "moshivis-bench" and r["config"] == "tiny" and r["quant"] == "bf16"
    assert set(r["scenarios"]) == {"moshi", "moshivis", "frame", "frame-image"}
    assert r["warmup"] == 2 and r["budget_ms"] == 80.0
    assert r["weights_gb"] == pytest.approx(tiny_weights_gb(2))  # bfloat16: 2 bytes a weight
    assert 0 < r["load_s"] < float((report_path.parent / "run_s").read_text())
    for s in r["scenarios"].values():
        assert len(s["steps_ms"]) == 6
        assert 0 < s["p50"] <= s["p90"] <= s["p99"] <= s["max"]
        assert s["max"] == max(s["steps_ms"])
        # The weights stay in memory while the steps run.
        assert s["first_step_ms"] > 0 and s["peak_memory_gb"] >= r["weights_gb"] > 0
    for name in ("frame", "frame-image"):
        s = r["scenarios"][name]
        assert 0 < s["host_ms"]["p50"] <= s["p50"] * 1.5
        assert set(s["stages"]) == {"encode", "model", "decode"}
        assert all(st["p50"] > 0 for st in s["stages"].values())
    assert r["image_kv_ms"] > 0 and r["image_encode_ms"] > 0
    assert 0 < r["mimi_encode_ms"] < r["mimi_frame_ms"]
    assert r["machine"]["mlx"] and "(cpu)" in r["machine"]["device"]
    assert "Device(" not in r["machine"]["device"]


def test_summary_names_every_scenario_and_stage(report_path):
    text = bench.summary(json.loads(report_path.read_text()))
    for word in ("moshi ", "moshivis", "frame ", "frame-image", "stages alone", "encode",
                 "the image adds", "budget 80 ms"):
        assert word in text


def test_plot(report_path):
    img = Image.open(report_path.with_suffix(".png"))
    assert img.size == (1200, 600)
    colours = {c for _, c in img.getcolors(maxcolors=1 << 16)}
    for name in ("moshi", "moshivis", "frame", "frame-image"):
        assert bench_colour(name) in colours


def bench_colour(name):
    from moshivis_mlx.plot import COLOURS

    return COLOURS[name]


def test_a_bundle_is_timed_with_its_own_codec_and_encoder(tmp_path):
    """With --weights the bundle's Mimi and image encoder are timed, not full-size random
    ones (a tiny bundle takes seconds)."""
    bundle = demo_bundle()
    r = bench.run(bench.BenchOptions(weights=bundle, steps=3, warmup=0,
                                     scenarios=("frame-image",), codec_frames=2,
                                     image_encodes=1))
    assert r["config"] == str(bundle) and r["quant"] == "float32"
    assert r["weights_gb"] < 0.05
    assert set(r["scenarios"]) == {"frame-image"} and r["warmup"] == 0
    assert r["mimi_frame_ms"] > 0 and r["image_encode_ms"] > 0


def test_pipelined_quantized_and_the_codec_on_the_cpu():
    r = bench.run(bench.BenchOptions(config="tiny", quant="q4", steps=4, warmup=1,
                                     scenarios=("moshi", "frame"), pipelined=True,
                                     codec_frames=0, image_encodes=0, codec_device="cpu"))
    assert "mimi_frame_ms" not in r and "image_encode_ms" not in r
    assert len(r["scenarios"]["moshi"]["steps_ms"]) == 4
    assert len(r["scenarios"]["frame"]["steps_ms"]) == 4
    assert r["pipelined"] and r["codec_device"] == "cpu"
    # q4 in groups of 32: 4 bits a weight and a 16-bit scale and bias per group (5/16 of
    # bfloat16), plus the norms, not quantized.
    assert 0.3 * tiny_weights_gb(2) < r["weights_gb"] < 0.35 * tiny_weights_gb(2)
    assert r["scenarios"]["moshi"]["peak_memory_gb"] >= r["weights_gb"]


def test_an_8_bit_attention_cache_takes_less_memory(monkeypatch):
    """--kv-bits 8 on a tiny model with 32-wide heads and a long window (the cache, not
    the weights, is most of the memory): the peak falls by most of the cache's saving."""
    import dataclasses

    from moshivis_mlx.models.lm import tiny

    monkeypatch.setitem(bench.PRESETS, "tiny",
                        lambda: dataclasses.replace(tiny(), num_heads=2, context=20_000))
    peaks = {}
    for bits in (None, 8):
        r = bench.run(bench.BenchOptions(config="tiny", quant="bf16", steps=2, warmup=0,
                                         scenarios=("moshivis",), codec_frames=0,
                                         image_encodes=0, kv_bits=bits))
        assert r["kv_bits"] == bits
        peaks[bits] = r["scenarios"]["moshivis"]["peak_memory_gb"]
    assert "KV cache 8-bit" in bench.summary(r)
    full_cache = 2 * 2 * 20_000 * 64 * 2 / 1e9  # layers, keys and values, bfloat16
    saved = full_cache * (1 - (8 + 32 / 32) / 16)  # 8 bits and a scale and bias per 32
    assert peaks[None] - peaks[8] == pytest.approx(saved, rel=0.1)


def test_8_bit_cache_on_heads_too_narrow():
    with pytest.raises(UsageError, match="--kv-bits 8: cannot quantize 16-wide"):
        bench.run(bench.BenchOptions(config="tiny", steps=1, warmup=0, scenarios=("moshi",),
                                     codec_frames=0, image_encodes=0, kv_bits=8))


def test_compare(report_path, capsys):
    assert bench_main(["--compare", str(report_path), str(report_path)]) == 0
    out = capsys.readouterr().out
    assert "moshivis     p99" in out and "1.00" in out and "frame-image" in out


def test_errors(tmp_path, capsys):
    bad = tmp_path / "x.json"
    bad.write_text("{}")
    assert bench_main(["--compare", str(bad), str(bad)]) == 1
    assert "not a moshivis-bench report" in capsys.readouterr().err
    assert bench_main(["--config", "tiny", "--steps", "0"]) == 1
    assert "--steps must be in [1, 1000000]" in capsys.readouterr().err
    assert bench_main(["--config", "tiny", "--scenarios", "nope", "--steps", "1"]) == 1
    err = capsys.readouterr().err
    assert "unknown scenario" in err and err.count("\n") == 1
