"""Megatron-LM integration: the --spec entry points called as megatron-core 0.19 calls them, and
the scheme inspector on models and dist checkpoints."""

import importlib.util

import pytest
import torch

import megatron_hybridnorm as mh
from megatron_hybridnorm.models.gpt import specs as gpt_specs
from megatron_hybridnorm import compat
from megatron_hybridnorm.models.gpt import entrypoints
from megatron_hybridnorm.inspect import detect_checkpoint, detect_scheme, main as inspect_main
from megatron_hybridnorm.schemes import get_scheme
from helpers import SEQ, VOCAB, batch, build_gpt, tiny_config
from test_moe import MOE


def build_like_megatron_lm(scheme, **config):
    """What pretrain_gpt.py does with --spec megatron_hybridnorm.entrypoints <scheme>: from 0.19,
    GPTModelBuilder calls the entry point; before, gpt_builders.py hands the object to
    GPTModel as the layer spec."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    spec_fn = compat.import_module(("megatron_hybridnorm.entrypoints", scheme))
    if not compat.SPEC_CALLABLES_ARE_CALLED:
        from megatron.core.models.gpt import GPTModel

        return GPTModel(config=tiny_config(**config), transformer_layer_spec=spec_fn,
                        vocab_size=VOCAB, max_sequence_length=SEQ,
                        position_embedding_type="rope")
    from megatron.training.models.gpt import GPTModelBuilder, GPTModelConfig

    cfg = GPTModelConfig(transformer=tiny_config(**config), transformer_layer_spec=spec_fn,
                         vocab_size=VOCAB, seq_length=SEQ, position_embedding_type="rope")
    return GPTModelBuilder(cfg).build_model(ProcessGroupCollection.use_mpu_process_groups(),
                                            vp_stage=None)


@pytest.mark.parametrize("scheme", mh.SCHEMES)
def test_entry_point_builds_a_gpt_model_as_megatron_calls_it(megatron_single_rank, capsys, scheme):
    model = build_like_megatron_lm(scheme, transformer_impl="local")
    tokens, labels, pos = batch()
    assert torch.isfinite(model(tokens, pos, None, labels=labels)).all()
    assert f"megatron-hybridnorm: built {scheme} on local modules, 4 layers" in capsys.readouterr().out
    assert detect_scheme(model).scheme == scheme


def test_entry_point_options_from_the_environment(megatron_single_rank, monkeypatch, capsys):
    monkeypatch.setenv("HYBRIDNORM_QKV_NORM", "full")
    model = build_like_megatron_lm("hybridnorm_star", transformer_impl="local")
    assert "(qkv_norm=full)" in capsys.readouterr().out
    assert detect_scheme(model).qkv_norm == "full"
    build_like_megatron_lm("prenorm", transformer_impl="local")  # one env for the baseline too
    assert "HYBRIDNORM_QKV_NORM does not apply to prenorm" in capsys.readouterr().out
    monkeypatch.setenv("HYBRIDNORM_MIXLN_FRACTION", "0.5")
    finding = detect_scheme(build_like_megatron_lm("mixln", transformer_impl="local"))
    assert finding.scheme == "mixln" and finding.mixln_fraction == 0.5


def test_te_ffn_norm_from_the_environment():
    env = {"HYBRIDNORM_TE_FFN_NORM": "fused_add"}
    assert entrypoints.options_from_env(get_scheme("hybridnorm_star"), env) == (
        {"te_ffn_norm": "fused_add"}, [])
    assert entrypoints.options_from_env(get_scheme("prenorm"), env) == (
        {}, ["HYBRIDNORM_TE_FFN_NORM does not apply to prenorm and is not used"])
    with pytest.raises(mh.SchemeConfigError, match="use_transformer_engine=True"):
        mh.get_decoder_block_spec(tiny_config(), "hybridnorm", te_ffn_norm="in_linear")


def test_entry_point_accepts_the_kernel_switch(monkeypatch):
    monkeypatch.setenv("HYBRIDNORM_KERNELS", "torch")  # read where the norms run, not here
    assert entrypoints.hybridnorm(tiny_config(transformer_impl="local")).layer_specs


def test_entry_point_refuses_unknown_or_bad_environment(monkeypatch):
    monkeypatch.setenv("HYBRIDNORM_QKVNORM", "full")
    with pytest.raises(ValueError, match="unknown HYBRIDNORM_QKVNORM"):
        entrypoints.hybridnorm(tiny_config(transformer_impl="local"))
    monkeypatch.delenv("HYBRIDNORM_QKVNORM")
    monkeypatch.setenv("HYBRIDNORM_MIXLN_FRACTION", "a quarter")
    with pytest.raises(ValueError, match="is not a float"):
        entrypoints.mixln(tiny_config(transformer_impl="local"))


@pytest.mark.skipif(gpt_specs.HAVE_TE, reason="Transformer Engine is installed")
def test_entry_point_on_te_impl_without_te_names_the_flag():
    # TransformerConfig's (and Megatron-LM's) default transformer_impl is transformer_engine
    with pytest.raises(mh.SchemeConfigError, match="--transformer-impl local"):
        entrypoints.hybridnorm(tiny_config())


def test_entry_points_cover_every_scheme():
    for s in mh.SCHEMES:
        assert getattr(entrypoints, s).__name__ == s


@pytest.mark.parametrize("scheme,moe", [(s, False) for s in mh.SCHEMES]
                         + [("hybridnorm_star", True), ("prenorm", True), ("hybridnorm", True)])
def test_inspect_names_the_scheme_of_a_checkpoint(megatron_single_rank, tmp_path, scheme, moe):
    from megatron.core import dist_checkpointing

    model = build_gpt(tiny_config(**(MOE if moe else {})), scheme)
    dist_checkpointing.save(model.sharded_state_dict(), str(tmp_path))
    finding = detect_checkpoint(tmp_path)
    assert finding.scheme == scheme and finding.num_layers == 4
    assert detect_scheme(model).scheme == scheme


def test_inspect_shows_megatrons_silent_fallback_as_prenorm(megatron_single_rank, tmp_path, capsys):
    """The model Megatron-LM builds when a --spec import fails is its default Pre-Norm."""
    from megatron.core import dist_checkpointing
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    cfg = tiny_config()
    model = GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(
        normalization="RMSNorm"), vocab_size=VOCAB, max_sequence_length=SEQ,
        position_embedding_type="rope")
    dist_checkpointing.save(model.sharded_state_dict(), str(tmp_path))
    assert inspect_main([str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith("scheme: prenorm, 4 layers")


def test_inspect_cli_on_a_folder_that_is_no_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        inspect_main([str(tmp_path)])
    assert e.value.code == 2 and "is not a dist checkpoint" in capsys.readouterr().err


def megatron_lm_load(monkeypatch, path):
    """Megatron-LM's --load as the entry points read it: its global args where the wheel ships
    megatron.training, else (megatron-core 0.16, whose Megatron-LM checkout brings it) the
    entry points' own reader."""
    from argparse import Namespace

    if importlib.util.find_spec("megatron.training") is not None:
        from megatron.training import global_vars

        monkeypatch.setattr(global_vars, "_GLOBAL_ARGS", Namespace(load=str(path)))
    else:
        monkeypatch.setattr(entrypoints, "_megatron_lm_args", lambda: Namespace(load=str(path)))


@pytest.mark.parametrize("saved,options,asked,env", [
    ("hybridnorm", {}, "prenorm", {}),
    ("hybridnorm", {}, "hybridnorm_star", {}),
    ("hybridnorm", {"qkv_norm": "full"}, "hybridnorm", {}),
    ("mixln", {}, "mixln", {"HYBRIDNORM_MIXLN_FRACTION": "0.5"}),
])
def test_entry_point_refuses_a_load_checkpoint_of_another_scheme(
        megatron_single_rank, tmp_path, monkeypatch, saved, options, asked, env):
    """Megatron-LM would load part of it in place before failing: refuse before building."""
    from megatron.core import dist_checkpointing

    from megatron_hybridnorm.transformer.layer import SchemeMismatchError

    model = build_gpt(tiny_config(), saved, **options)
    dist_checkpointing.save(model.sharded_state_dict(), str(tmp_path))
    megatron_lm_load(monkeypatch, tmp_path)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SchemeMismatchError, match=f"--load {tmp_path} holds {saved}"):
        getattr(entrypoints, asked)(tiny_config(transformer_impl="local"))
    monkeypatch.delenv("HYBRIDNORM_MIXLN_FRACTION", raising=False)
    if not options:  # the matching scheme builds
        getattr(entrypoints, saved)(tiny_config(transformer_impl="local"))


def test_entry_point_with_an_empty_load_folder_builds(tmp_path, monkeypatch):
    megatron_lm_load(monkeypatch, tmp_path)
    assert entrypoints.hybridnorm(tiny_config(transformer_impl="local")).layer_specs


def test_a_load_folder_without_a_dist_checkpoint_is_said_at_start_up(tmp_path, monkeypatch,
                                                                      capsys):
    """--ckpt-format torch: the scheme guard cannot read it; it said nothing and went on."""
    from argparse import Namespace

    (tmp_path / "latest_checkpointed_iteration.txt").write_text("10")
    (tmp_path / "iter_0000010" / "mp_rank_00").mkdir(parents=True)
    (tmp_path / "iter_0000010" / "mp_rank_00" / "model_optim_rng.pt").write_bytes(b"")
    monkeypatch.setattr(entrypoints, "_megatron_lm_args", lambda: Namespace(load=str(tmp_path)))
    entrypoints.hybridnorm(tiny_config(transformer_impl="local"))
    out = capsys.readouterr().out
    assert f"megatron-hybridnorm: --load {tmp_path} holds no dist checkpoint" in out
    assert "not checked before loading" in out
    empty = tmp_path / "fresh"
    empty.mkdir()
    monkeypatch.setattr(entrypoints, "_megatron_lm_args", lambda: Namespace(load=str(empty)))
    entrypoints.hybridnorm(tiny_config(transformer_impl="local"))
    assert "holds no dist checkpoint" not in capsys.readouterr().out  # a fresh run
