"""The multi-process launcher reports which rank failed, and why, and never hangs."""

import pytest

from megatron_hybridnorm.testing import Parallel, RankFailure, run_distributed

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
    """Running on a CPU is a product feature (megatron_hybridnorm.harness.cpu); the training command,
    the check and the export imported it from megatron_hybridnorm.testing."""
    import ast
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "megatron_hybridnorm"
    offenders = []
    for path in package.rglob("*.py"):
        if "testing" in path.relative_to(package).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                mod = ("." * node.level) + (node.module or "")
                if "testing" in mod.split(".") or mod.endswith("testing"):
                    offenders.append(f"{path.relative_to(package)}: from {mod} import ...")
    assert not offenders, offenders
