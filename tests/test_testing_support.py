"""The multi-process launcher reports which rank failed, and why, and never hangs."""

import pytest

from launcher import Parallel, RankFailure, run_distributed

import dist_cases

pytestmark = pytest.mark.slow


def test_results_come_back_by_rank():
    assert run_distributed(dist_cases.fail_on_rank, 2, Parallel(tp=2), args=(-1,)) == [0, 1]


def test_failing_rank_is_named_with_its_traceback():
    with pytest.raises(RankFailure) as err:
        run_distributed(dist_cases.fail_on_rank, 2, args=(1,))
    msg = str(err.value)
    assert "rank 1:" in msg and "deliberate failure on rank 1" in msg and "rank 0:" not in msg


def test_hanging_rank_times_out_and_is_named():
    with pytest.raises(RankFailure, match=r"ranks \[1\] did not finish within 20 s"):
        run_distributed(dist_cases.hang_on_rank, 2, args=(1,), timeout=20)


def test_the_product_does_not_import_the_test_support():
    """Running on a CPU is a product feature (megatron_hybridnorm.harness.cpu); the launcher
    is the tests' own (tests/launcher.py, not in the wheel), and no module of the package
    imports it or a megatron_hybridnorm.testing."""
    import ast
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "megatron_hybridnorm"
    assert not (package / "testing").exists()
    offenders = []
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                    [("." * node.level) + (node.module or "")]
                    if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(package)}: {m}" for m in mods
                          if m.split(".")[0] in ("launcher", "triton_interpreter")
                          or "testing" in m.split(".")]
    assert not offenders, offenders
