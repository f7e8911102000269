"""``python -m megatron_hybridnorm.check`` on gloo CPUs: it passes in the layouts the project
supports, fails with the broken parameter or layer named when a fault is switched on, and
refuses a layout the world size cannot hold."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from launcher import Parallel, run_distributed

import dist_cases

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = {"tp2": ["--tp", "2"], "pp2": ["--pp", "2"], "tp2-sp": ["--tp", "2", "--sp"],
           "ep2": ["--ep", "2"], "dp2-distopt": ["--distopt"]}
SCHEMES = ("hybridnorm", "hybridnorm_star", "prenorm")
FAULTS = {"v_norm_tp": (["--scheme", "hybridnorm", "--tp", "2"],
                        "gradients, step 1: Q/K/V norm weights", "v_layernorm.weight"),
          "first_block_every_stage": (["--scheme", "hybridnorm_star", "--pp", "2"],
                                      "norms in the right places (per global layer)", "layer 2:")}


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """Every scheme in every layout, and the two faults, on 2 gloo ranks (one spawn)."""
    tmp = tmp_path_factory.mktemp("check")
    runs = {(s, name): ["--scheme", s, *argv] for s in SCHEMES for name, argv in LAYOUTS.items()}
    runs.update({("fault", f): [*argv, "--fault", f] for f, (argv, _, _) in FAULTS.items()})
    argvs = [[*argv, "--out", str(tmp / f"{'-'.join(key)}.json")] for key, argv in runs.items()]
    results = run_distributed(dist_cases.check_commands, 2, Parallel(), args=(argvs,),
                              timeout=1500)[0]
    return dict(zip(runs, results))


pytestmark = pytest.mark.slow


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_check_passes(reports, scheme, layout):
    code, report = reports[(scheme, layout)]
    failed = [c for c in report["checks"] if not c["ok"]]
    assert code == 0 and report["ok"] and not failed, failed
    names = {c["name"] for c in report["checks"]}
    assert "checkpoint saved in this layout, loaded at one rank (max abs)" in names
    assert ("gradients, step 1: Q/K/V norm weights" in names) == (
        scheme != "prenorm" and layout != "dp2-distopt")
    env = report["environment"]
    assert env["backend"] == "gloo" and env["world_size"] == 2 and env["norm_kernels"]


@pytest.mark.parametrize("fault", FAULTS)
def test_a_fault_fails_the_check_and_is_named(reports, fault):
    code, report = reports[("fault", fault)]
    _, check_name, named = FAULTS[fault]
    [check] = [c for c in report["checks"] if c["name"] == check_name]
    assert code == 1 and not report["ok"] and not check["ok"] and named in check["worst"]


def test_a_layout_the_world_cannot_hold_is_refused():
    out = subprocess.run([sys.executable, "-m", "megatron_hybridnorm.check", "--tp", "2"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 2
    assert "--tp 2 x --pp 1 x --cp 1 = 2 does not divide the 1 processes: start a multiple " \
           "of 2" in out.stderr


def torchrun_check(nproc: int, args: list[str], cwd):
    """``python -m megatron_hybridnorm.check ARGS`` under torchrun on ``nproc`` CPU processes."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
         "--master-port", str(port), "-m", "megatron_hybridnorm.check", *args],
        capture_output=True, text=True, cwd=cwd, timeout=600,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out


def test_the_command_under_torchrun(tmp_path):
    out = torchrun_check(2, ["--scheme", "hybridnorm_star", "--tp", "2", "--sp", "--out",
                             str(tmp_path / "check.json")], ROOT)
    assert "PASS: 16/16 checks" in out.stdout
    assert "megatron-hybridnorm check: hybridnorm_star on local (fp32), TP 2 x PP 1 x CP 1 x " \
           "EP 1 x DP 1, SP; 2 ranks, gloo, cpu" in out.stdout
    assert (tmp_path / "check.json").is_file()


def test_the_command_writes_no_report_unless_asked(tmp_path):
    """It wrote check.json into the current directory by default (a checkout's, say)."""
    out = torchrun_check(1, ["--scheme", "hybridnorm"], tmp_path)
    assert "(--out PATH writes the JSON report)" in out.stdout
    assert list(tmp_path.iterdir()) == []
