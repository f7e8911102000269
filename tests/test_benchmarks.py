"""The benchmark script runs end to end (tiny shapes; on a CPU under the interpreter)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_benchmark_script_runs(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_norms.py"), "--smoke",
                          "--out", str(tmp_path / "r.json")], capture_output=True, text=True,
                         env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads((tmp_path / "r.json").read_text())
    for part in ("rms_norm", "add_rms_norm", "qkv_norm"):
        timings = {k: v for k, v in r[part].items() if isinstance(v, dict)}
        assert {"torch", "triton"} <= set(timings)
        assert all(v["seconds"] > 0 for v in timings.values())
    assert {"rope_alone", "torch_then_rope", "triton_with_rope"} <= set(r["qkv_norm"])
    assert {"prenorm", "prenorm_kernels", "hybridnorm_torch_norms", "hybridnorm_kernels",
            "time_hybridnorm_kernels_over_prenorm"} <= set(r["block"])


def test_benchmark_refuses_to_time_a_cpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_norms.py")],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "measures a GPU" in out.stderr


@pytest.mark.slow
def test_saved_activation_count_runs(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "saved_activations.py"),
                          "--seq", "8", "--layers", "1", "--out", str(tmp_path / "s.json")],
                         capture_output=True, text=True,
                         env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads((tmp_path / "s.json").read_text())["rows"]
    assert set(rows) == {"prenorm_torch", "prenorm_triton", "hybridnorm_torch", "hybridnorm_triton"}
    # the torch norms keep an fp32 copy of their input; the kernels keep the bf16 input + rstd
    for scheme in ("prenorm", "hybridnorm"):
        assert rows[f"{scheme}_triton"]["bytes_per_token_layer"] < \
            rows[f"{scheme}_torch"]["bytes_per_token_layer"]
    assert rows["prenorm_torch"]["over_prenorm_torch"] == 1.0
