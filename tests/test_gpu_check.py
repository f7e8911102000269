"""scripts/gpu_check.py, the one command for a GPU machine: its dry run passes on the CPU and
writes every field the GPU run fills; its log and report parsers read real formats."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import gpu_check  # noqa: E402

# three iteration lines as Megatron-LM core_v0.19 prints them (log interval 1)
MEGATRON_LOG = """\
megatron-hybridnorm: built hybridnorm_star on transformer_engine modules, 4 layers on this stage
 [2026-11-27 10:01:02] iteration        1/      20 | consumed samples:            8 | elapsed \
time per iteration (ms): 812.3 | learning rate: 1.500000E-04 | global batch size:     8 | lm \
loss: 1.042017E+01 | loss scale: 1.0 | grad norm: 3.412 | number of skipped iterations:   0 |
 [2026-11-27 10:01:02] iteration        2/      20 | consumed samples:           16 | lm loss: \
1.031017E+01 | loss scale: 1.0 |
 [2026-11-27 10:01:03] iteration       20/      20 | consumed samples:          160 | lm loss: \
6.321000E+00 | loss scale: 1.0 |
"""


def test_training_log_parser():
    r = gpu_check.parse_training_log(MEGATRON_LOG, "transformer_engine")
    assert r["startup_line_found"] and r["iterations"] == 3
    assert r["losses"] == [10.42017, 10.31017, 6.321] and r["loss_falling"]
    silent_fallback = MEGATRON_LOG.splitlines()[1:]  # Megatron-LM built its default model
    assert not gpu_check.parse_training_log("\n".join(silent_fallback),
                                            "transformer_engine")["startup_line_found"]
    assert not gpu_check.parse_training_log(MEGATRON_LOG, "local")["startup_line_found"]


def test_pytest_report_parser(tmp_path):
    (tmp_path / "t.py").write_text(
        "import pytest\n"
        "def test_ok(): pass\n"
        "def test_bad(): assert False\n"
        "@pytest.mark.skip(reason='x')\ndef test_skip(): pass\n"
        "def test_xfail(): pytest.xfail('known')\n")
    xml, log = tmp_path / "r.xml", tmp_path / "r.log"
    out = subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider",
                          f"--junitxml={xml}", "t.py"], capture_output=True, text=True,
                         cwd=tmp_path)
    log.write_text(out.stdout)
    r = gpu_check.pytest_summary(xml)
    assert (r["passed"], r["failed"], r["skipped"], r["xfailed"]) == (1, 1, 1, 1)
    assert r["failures"] == ["t::test_bad"]
    # a run cut at its time cap leaves no XML: the verbose log tells the same
    xml.unlink()
    r = gpu_check.pytest_summary(xml, log)
    assert (r["passed"], r["failed"], r["skipped"], r["xfailed"]) == (1, 1, 1, 1)
    assert r["failures"] == ["t.py::test_bad"]


@pytest.mark.parametrize("name", sorted(gpu_check.RUNS))
def test_megatron_lm_runs_have_valid_arguments(name):
    args = gpu_check.validate_megatron_lm_args(gpu_check.megatron_lm_argv(name))
    assert args.spec == ["megatron_hybridnorm.entrypoints", gpu_check.SCHEME]
    assert args.train_iters == gpu_check.ITERATIONS and args.mock_data
    assert (args.fp8 is not None) == (name == "te_fp8")


@pytest.mark.slow
def test_dry_run_passes_and_fills_every_field(tmp_path):
    from test_benchmarks import check_benchmark_json

    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--dry-run",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    r = json.loads((tmp_path / "gpu_check.json").read_text())
    assert r["dry_run"] and r["ok"] and set(r["stages"]) == set(gpu_check.STAGES)
    assert {"card", "torch", "cuda", "date", "wall_seconds"} <= set(r)
    tests = r["stages"]["tests"]
    assert tests["passed"] > 100 and tests["failed"] == tests["errors"] == 0
    for name in gpu_check.RUNS:
        run = r["stages"][name]
        assert {"argv", "returncode", "seconds", "startup_line", "startup_line_found",
                "kernel_lines", "iterations", "losses", "loss_first", "loss_last",
                "loss_falling", "log"} <= set(run)
        assert (tmp_path / run["log"]).is_file()
    assert r["stages"]["local"]["startup_line_found"]  # the entry point built from the args
    check_benchmark_json(r["stages"]["bench"]["results"], te_expected=False)
