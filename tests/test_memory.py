"""The weights are kept resident where the backend says how much it can keep (Metal),
and nothing changes where it does not (the CPU here, CUDA)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from moshivis_mlx import memory


def _model(n: int) -> nn.Module:
    m = nn.Linear(n, n, bias=False)
    m.weight = mx.zeros((n, n), dtype=mx.float32)
    return m


def _backend(monkeypatch, info: dict) -> list[int]:
    limits: list[int] = []
    monkeypatch.setattr(memory.mx, "device_info", lambda: info)
    monkeypatch.setattr(memory.mx, "set_wired_limit", lambda n: limits.append(n) or 0)
    return limits


def test_weight_bytes_counts_every_model():
    assert memory.weight_bytes(_model(8), None, _model(4)) == (64 + 16) * 4


def test_the_wired_limit_is_the_recommended_working_set(monkeypatch):
    limits = _backend(monkeypatch, {"max_recommended_working_set_size": 10_000})
    assert memory.wire_weights(_model(8)) is None  # 256 bytes: far from the limit
    assert limits == [10_000]


def test_weights_close_to_the_limit_are_said(monkeypatch):
    limits = _backend(monkeypatch, {"max_recommended_working_set_size": 1_000})
    warning = memory.wire_weights(_model(16))  # 1,024 bytes > 0.9 x 1,000
    assert limits == [1_000]
    assert warning is not None and "-q q4" in warning


def test_no_recommended_size_changes_nothing(monkeypatch):
    limits = _backend(monkeypatch, {"architecture": "x86_64"})
    assert memory.wire_weights(_model(64)) is None and limits == []

