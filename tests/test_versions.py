"""What differs between megatron-core versions (``megatron_hybridnorm/compat.py``): the facts it
detects match the installed version, the package imports everywhere, HybridModel is refused
with a clear error where it is missing, and the GPT entry points build the scheme's model the
way this version's Megatron-LM reads ``--spec``."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from megatron.core.transformer.transformer_layer import TransformerLayer

import megatron_hybridnorm as mh
from helpers import SEQ, VOCAB, batch, randomize_norms, tiny_config
from megatron_hybridnorm import compat
from megatron_hybridnorm.models.gpt import entrypoints
from megatron_hybridnorm.inspect import detect_scheme
from test_reference import TOL, compare_to_reference

HERE = Path(__file__).resolve().parent


def test_the_detected_facts_are_this_versions():
    assert compat.LAYER_HOOKS == hasattr(TransformerLayer, "_apply_mlp_bda_step")
    assert compat.LAYER_HOOKS != hasattr(TransformerLayer, "_forward_post_mlp")
    assert compat.HAVE_HYBRID_MODEL == (
        importlib.util.find_spec("megatron.core.models.hybrid") is not None)
    major_minor = tuple(int(x) for x in compat.VERSION.split(".")[:2])
    # the table in compat.py, checked against the version string here only
    assert compat.HAVE_HYBRID_MODEL == (major_minor >= (0, 18))
    assert compat.SPEC_CALLABLES_ARE_CALLED == (major_minor >= (0, 19))
    assert compat.LAYER_HOOKS == (major_minor >= (0, 20))
    assert compat.NORM_TUPLES == (major_minor >= (0, 17))
    # compat reads _forward_mlp's signature; what the code does, read here from its source
    import inspect

    unpacks = ("pre_mlp_layernorm_output, residual = pre_mlp_layernorm_output"
               in inspect.getsource(TransformerLayer._forward_mlp))
    assert compat.NORM_TUPLES == (compat.LAYER_HOOKS or unpacks)


def test_hybrid_model_needs_a_version_that_has_it(monkeypatch):
    monkeypatch.setattr(compat, "HAVE_HYBRID_MODEL", False)
    with pytest.raises(ImportError, match=r"needs megatron-core >= 0\.18 .* this is megatron-core"):
        mh.get_hybrid_stack_spec(tiny_config(), "hybridnorm", "*-*-")


@pytest.mark.skipif(compat.HAVE_HYBRID_MODEL, reason="this megatron-core has HybridModel")
def test_without_hybrid_model_the_package_imports_and_the_hybrid_spec_is_refused():
    with pytest.raises(ImportError, match=r"needs megatron-core >= 0\.18"):
        mh.get_hybrid_stack_spec(tiny_config(), "hybridnorm", "*-*-")
    with pytest.raises(ImportError, match=r"needs megatron-core >= 0\.18"):
        import megatron_hybridnorm.models.hybrid  # noqa: F401


def test_a_failed_spec_import_raises_on_every_version():
    with pytest.raises(ImportError, match="no_such_module"):
        compat.import_module(("no_such_module", "hybridnorm"))


def gpt_from_entry_point(spec, **config):
    """What Megatron-LM's gpt_builders.py does with the imported --spec object before 0.19:
    ``GPTModel(transformer_layer_spec=import_module(args.spec), ...)``."""
    from megatron.core.models.gpt import GPTModel

    return GPTModel(config=tiny_config(transformer_impl="local", **config),
                    transformer_layer_spec=spec, vocab_size=VOCAB, max_sequence_length=SEQ,
                    position_embedding_type="rope", rotary_base=500000,
                    share_embeddings_and_output_weights=False)


@pytest.mark.parametrize("scheme", mh.SCHEMES)
def test_layer_spec_entry_point_builds_the_scheme(megatron_single_rank, capsys, scheme):
    """The entry point Megatron-LM before 0.19 gets (a layer ModuleSpec), built as those versions
    build it, on this version: every scheme's model, equal to the float64 reference. On 0.16 to
    0.18 it is the module attribute itself; elsewhere it is built here the same way."""
    build = getattr(entrypoints, scheme)
    spec = build if not compat.SPEC_CALLABLES_ARE_CALLED else \
        entrypoints._layer_spec_entry_point(mh.get_scheme(scheme), build)
    if not compat.SPEC_CALLABLES_ARE_CALLED:
        assert compat.import_module(("megatron_hybridnorm.entrypoints", scheme)) is spec
    torch.manual_seed(0)
    model = gpt_from_entry_point(spec, persist_layer_norm=False)
    out = capsys.readouterr().out
    assert f"megatron-hybridnorm: built {scheme} on local modules, 4 layers on this stage" in out
    assert "final norm megatron-core's" in out
    assert detect_scheme(model).scheme == scheme
    randomize_norms(model)
    worst, errs = compare_to_reference(model, scheme, model.config)
    assert worst < TOL, {k: v for k, v in errs.items() if v >= TOL}
    assert callable(spec) and spec(tiny_config(transformer_impl="local")).layer_specs


@pytest.mark.skipif(not compat.SPEC_CALLABLES_ARE_CALLED,
                    reason="Megatron-LM before 0.19 does not call a --spec callable")
def test_entry_points_are_callables_where_megatron_lm_calls_them():
    from megatron.core.transformer.spec_utils import ModuleSpec

    for scheme in mh.SCHEMES:  # GPTModelBuilder calls only what is not a ModuleSpec
        assert not isinstance(getattr(entrypoints, scheme), ModuleSpec)


def test_layer_spec_entry_point_refuses_a_final_norm_that_cannot_run(monkeypatch):
    from megatron.core.transformer import transformer_block
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    monkeypatch.setattr(transformer_block, "LayerNormImpl", WrappedTorchNorm)
    with pytest.raises(mh.SchemeConfigError, match="--no-persist-layer-norm"):
        entrypoints._megatron_final_norm(tiny_config(persist_layer_norm=True))


# ---- a dist checkpoint across megatron-core versions ------------------------------------------

OTHER = "MCORE_OTHER_PYTHON"


def _run(python, *args):
    out = subprocess.run([python, str(HERE / "checkpoint_across_versions.py"), *args],
                         capture_output=True, text=True, cwd=HERE.parent, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.slow
@pytest.mark.parametrize("direction", ["this_to_other", "other_to_this"])
def test_dist_checkpoint_loads_across_versions(tmp_path, direction):
    """A checkpoint saved under one megatron-core loads under the other with the same loss.
    The other version's python is ``$MCORE_OTHER_PYTHON`` (the CI matrix sets it)."""
    import os

    other = os.environ.get(OTHER)
    if not other:
        pytest.skip(f"set {OTHER} to another megatron-core version's python to run this")
    saver, loader = (sys.executable, other) if direction == "this_to_other" else (other,
                                                                                   sys.executable)
    for scheme in ("hybridnorm_star", "postnorm"):
        saved = _run(saver, "save", str(tmp_path / scheme), scheme)
        loaded = _run(loader, "load", str(tmp_path / scheme), scheme)
        v_save, loss_save = saved.split()
        v_load, loss_load = loaded.split()
        assert v_save != v_load, (v_save, v_load)  # two versions really ran
        assert abs(float(loss_save) - float(loss_load)) < 1e-6, (saved, loaded)


@pytest.mark.slow
@pytest.mark.parametrize("scheme,vpp", [("hybridnorm_star", None), ("mixln", None),
                                        ("hybridnorm_star", 2)])
def test_layer_spec_entry_point_places_the_special_layers_globally_under_pp(scheme, vpp):
    """Before 0.19 the entry point is one layer spec for every layer; SchemeLayer builds each
    from its global position: HybridNorm*'s block 0 and Mix-LN's first layers, whatever the
    pipeline stage and virtual stage."""
    from dataclasses import asdict

    import dist_cases
    from launcher import Parallel, run_distributed

    n = 8
    ranks = run_distributed(dist_cases.layer_spec_entry_point_stage, 2,
                            Parallel(pp=2, vpp=vpp), args=(scheme, n, vpp), timeout=300)
    built = {k: v for r in ranks for k, v in r.items()}
    assert sorted(built) == list(range(n)) and all(len(r) == n // 2 for r in ranks)
    want = [asdict(lay) for lay in mh.get_scheme(scheme).layouts(n)]
    assert [built[i] for i in range(n)] == want


@pytest.mark.skipif(importlib.util.find_spec("megatron.training") is None,
                    reason="this megatron-core's wheel ships no megatron.training (its parser)")
@pytest.mark.parametrize("scheme", ["hybridnorm_star", "mixln"])
def test_entry_point_through_this_versions_megatron_lm_parser(megatron_single_rank, capsys,
                                                              scheme):
    """--spec as this version's Megatron-LM reads it: its parser, its TransformerConfig from the
    arguments, the imported object (called from 0.19, the spec itself before)."""
    import argparse

    from megatron.core.models.gpt import GPTModel
    from megatron.training.arguments import (
        add_megatron_arguments,
        core_transformer_config_from_args,
    )

    parser = add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))
    args = parser.parse_args([
        "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
        "--group-query-attention", "--num-query-groups", "2", "--ffn-hidden-size", "96",
        "--swiglu", "--normalization", "RMSNorm", "--position-embedding-type", "rope",
        "--disable-bias-linear", "--seq-length", "16", "--max-position-embeddings", "16",
        "--micro-batch-size", "1", "--transformer-impl", "local", "--no-rope-fusion",
        "--no-gradient-accumulation-fusion", "--no-persist-layer-norm",
        "--spec", "megatron_hybridnorm.entrypoints", scheme])
    args.params_dtype, args.kv_channels = torch.float32, 16
    config = core_transformer_config_from_args(args)
    spec = compat.import_module(tuple(args.spec))
    if compat.SPEC_CALLABLES_ARE_CALLED:  # GPTModelBuilder
        spec = spec(config, vp_stage=None)
    model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=VOCAB,
                     max_sequence_length=SEQ, position_embedding_type="rope")
    assert f"megatron-hybridnorm: built {scheme} on local modules" in capsys.readouterr().out
    assert detect_scheme(model).scheme == scheme
    tokens, labels, pos = batch()
    assert torch.isfinite(model(tokens, pos, None, labels=labels)).all()
