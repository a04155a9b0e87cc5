"""Shared pieces of the converter tests: the CLI in-process, comparing bundles, and checking
that a refused conversion left nothing behind."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
from moshivis_mlx.cli.convert import main as convert_main


def run(*args) -> tuple[int, str, str]:
    """The CLI in-process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = convert_main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def ok(*args) -> str:
    rc, out, err = run(*args)
    assert rc == 0, err
    return out


def bundle_tensors(bundle: Path, stem: str = "model") -> dict[str, np.ndarray]:
    """Every stored tensor of a part (shards included), as NumPy (bf16 viewed as uint16)."""
    index = bundle / f"{stem}.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) \
        if index.exists() else [f"{stem}.safetensors"]
    out = {}
    for f in files:
        for k, v in mx.load(str(bundle / f)).items():
            out[k] = np.array(v.view(mx.uint16) if v.dtype == mx.bfloat16 else v)
    return out


def assert_same_tensors(a: Path, b: Path, stem: str = "model") -> None:
    ta, tb = bundle_tensors(a, stem), bundle_tensors(b, stem)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype, k
        np.testing.assert_array_equal(ta[k], tb[k], err_msg=k)


def nothing_left(out: Path) -> bool:
    return not out.exists() and not list(out.parent.glob(f".{out.name}.*"))
