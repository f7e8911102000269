"""The runner's own behaviour, without starting Megatron-LM (its launches are in
test_megatron_lm_loop.py): where it finds Megatron-LM, what it refuses, what it changes."""

import pytest

from megatron_hybridnorm import rehearse


def test_without_megatron_lm_it_says_what_to_pass(monkeypatch, tmp_path):
    monkeypatch.delenv("MEGATRON_LM", raising=False)
    with pytest.raises(SystemExit, match="pass --megatron-lm DIR or set MEGATRON_LM=DIR"):
        rehearse.main(["pretrain_gpt.py", "--num-layers", "2"])
    with pytest.raises(SystemExit, match=f"{tmp_path} holds no pretrain_hybrid.py"):
        rehearse.main(["--megatron-lm", str(tmp_path), "pretrain_hybrid.py"])


def test_everything_after_the_script_is_megatron_lms(tmp_path):
    ns = rehearse.parser().parse_args(["--losses", "l.jsonl", "pretrain_gpt.py", "--losses",
                                       "x", "--megatron-lm", "y"])
    assert ns.script == "pretrain_gpt.py" and str(ns.losses) == "l.jsonl"
    assert ns.args == ["--losses", "x", "--megatron-lm", "y"]
    with pytest.raises(SystemExit):
        rehearse.parser().parse_args(["train.py"])


def test_a_spec_module_that_does_not_import_is_refused():
    with pytest.raises(SystemExit, match="does not import .* train its default Pre-Norm"):
        rehearse.check_spec(("megatron_hybridnorm.entrypoint", "hybridnorm"))
    rehearse.check_spec(("megatron_hybridnorm.entrypoints", "hybridnorm"))
    assert rehearse.spec_of(["--x", "--spec", "m", "n"]) == ("m", "n")
    with pytest.raises(SystemExit, match="--spec takes two values"):
        rehearse.spec_of(["--spec", "m", "--x"])


def test_gloo_stands_in_for_nccl_and_says_so():
    assert rehearse.cpu_arguments(["--a"]) == (
        ["--a", "--distributed-backend", "gloo"], ["--distributed-backend gloo (NCCL needs GPUs)"])
    args, said = rehearse.cpu_arguments(["--distributed-backend", "nccl", "--b"])
    assert args == ["--distributed-backend", "gloo", "--b"] and said == [
        "--distributed-backend nccl: gloo"]
    assert rehearse.cpu_arguments(["--distributed-backend", "gloo"])[1] == []


def test_a_misspelt_scheme_is_named_where_megatron_looks_it_up():
    """megatron-core's import_module reads vars(module)[name]: on every version the entry-point
    modules answer a missing name with the schemes (0.20 wraps it in its ImportError)."""
    from megatron.core.transformer.spec_utils import import_module

    from megatron_hybridnorm import compat
    from megatron_hybridnorm.schemes import SCHEMES

    modules = ["megatron_hybridnorm.entrypoints"]
    if compat.HAVE_HYBRID_MODEL:  # before 0.18 the hybrid entry points refuse to import at all
        modules.append("megatron_hybridnorm.hybrid.entrypoints")
    for module in modules:
        with pytest.raises((KeyError, ImportError)) as e:
            import_module((module, "hybridnorm_starr"))
        error = e.value if isinstance(e.value, KeyError) else e.value.__cause__
        assert str(error) == (f"--spec {module} hybridnorm_starr: {module} has no scheme "
                              f"'hybridnorm_starr'; its entry points are {', '.join(SCHEMES)}")
        assert import_module((module, "hybridnorm")) is not None
