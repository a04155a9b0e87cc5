"""moshivis-bench: the report, the plot, the comparison (no timing is asserted)."""

from __future__ import annotations

import json
import time

import pytest
from mlx.utils import tree_flatten
from moshivis_mlx.cli.bench import main as bench_main
from PIL import Image

from moshivis_mlx import LM, bench


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
    assert set(r["scenarios"]) == {"moshi", "moshivis"}
    assert r["weights_gb"] == pytest.approx(tiny_weights_gb(2))  # bfloat16: 2 bytes a weight
    for s in r["scenarios"].values():
        assert len(s["steps_ms"]) == 6
        assert 0 < s["p50"] <= s["p90"] <= s["p99"] <= s["max"]
        # The weights stay in memory while the steps run.
        assert s["first_step_ms"] > 0 and s["peak_memory_gb"] >= r["weights_gb"]
    assert 0 < r["load_s"] < float((report_path.parent / "run_s").read_text())
    assert r["image_kv_ms"] > 0
    assert 0 < r["mimi_encode_ms"] < r["mimi_frame_ms"]
    assert r["image_encode_ms"] > 0
    assert r["machine"]["mlx"]


def test_plot(report_path):
    img = Image.open(report_path.with_suffix(".png"))
    assert img.size == (1200, 600)
    # Both scenario colours are drawn.
    colours = {c for _, c in img.getcolors(maxcolors=1 << 16)}
    assert (31, 119, 180) in colours and (214, 39, 40) in colours


def test_pipelined_and_quantized(tmp_path):
    start = time.perf_counter()
    r = bench.run(bench.BenchOptions(config="tiny", quant="q4", steps=4, warmup=1,
                                     scenarios=("moshi",), pipelined=True, codec_frames=0,
                                     image_encodes=0))
    run_s = time.perf_counter() - start
    assert "mimi_frame_ms" not in r and "image_encode_ms" not in r
    assert len(r["scenarios"]["moshi"]["steps_ms"]) == 4
    assert r["pipelined"]
    # q4 in groups of 32: 4 bits a weight and a 16-bit scale and bias per group (5/16 of
    # bfloat16), plus the norms, not quantized.
    assert 0.3 * tiny_weights_gb(2) < r["weights_gb"] < 0.35 * tiny_weights_gb(2)
    assert r["scenarios"]["moshi"]["peak_memory_gb"] >= r["weights_gb"]
    assert 0 < r["load_s"] < run_s


def test_compare(report_path, capsys):
    assert bench_main(["--compare", str(report_path), str(report_path)]) == 0
    out = capsys.readouterr().out
    assert "moshivis   p99" in out and "1.00" in out


def test_errors(tmp_path, capsys):
    bad = tmp_path / "x.json"
    bad.write_text("{}")
    assert bench_main(["--compare", str(bad), str(bad)]) == 1
    assert "not a moshivis-bench report" in capsys.readouterr().err
    assert bench_main(["--config", "tiny", "--steps", "0"]) == 1
    assert bench_main(["--config", "tiny", "--scenarios", "nope", "--steps", "1"]) == 1
    assert "unknown scenario" in capsys.readouterr().err
