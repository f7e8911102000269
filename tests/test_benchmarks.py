"""The benchmark script runs end to end and writes every field (tiny shapes; on a CPU under the
interpreter)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def check_benchmark_json(r: dict, te_expected: bool) -> None:
    """Every field the GPU run fills is there (TE's only where TE runs)."""
    import bench_norms

    assert {"device", "versions", "date", "shapes", "copy_bandwidth_bytes_per_s"} <= set(r)
    for part in ("rms_norm", "add_rms_norm", "qkv_norm"):
        k = r["kernels"][part]
        for impl in ("torch", "triton"):
            assert k[impl]["seconds_fwd"] > 0 and k[impl]["seconds_fwd_bwd"] > 0
            assert k[impl]["bandwidth_fraction_fwd_bwd"] > 0
        assert k["time_triton_over_torch"] > 0
    assert {"rope_alone", "torch_then_rope", "triton_with_rope",
            "time_triton_with_rope_over_rope_alone"} <= set(r["kernels"]["qkv_norm"])
    for kernel in ("rms_fwd", "rms_bwd", "qkv_fwd", "qkv_bwd"):
        t = r["tune"][kernel]
        assert len(t["candidates"]) >= 3 and t["best"] in [c["config"] for c in t["candidates"]]
        assert t["default"] == t["candidates"][0]["config"] and t["time_best_over_default"] <= 1
    local = r["local"]
    for label, _, _ in bench_norms.LOCAL_BLOCKS:
        assert local[label]["seconds"] > 0
        if label != "prenorm":
            assert f"time_{label}_over_prenorm" in local
    if not te_expected:
        assert "skipped" in r["te"]
        return
    for precision in bench_norms.TE_PRECISIONS:
        for label, _, _ in bench_norms.TE_BLOCKS:
            assert r["te"][precision][label]["seconds"] > 0, r["te"][precision][label]
            if label != "prenorm":
                assert f"time_{label}_over_prenorm" in r["te"][precision]


@pytest.mark.slow
def test_benchmark_script_runs(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_norms.py"), "--smoke",
                          "--out", str(tmp_path / "r.json")], capture_output=True, text=True,
                         env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-3000:]
    check_benchmark_json(json.loads((tmp_path / "r.json").read_text()), te_expected=False)


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
