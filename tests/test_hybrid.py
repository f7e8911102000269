"""HybridModel: every scheme as a hybrid layer pattern, against our GPTModel with the same
weights; the position-dependent blocks; refused patterns; inspect; the pretrain_hybrid.py
entry points; GPT checkpoints into HybridModel."""

import re

import pytest
import torch

import megatron_hybridnorm as mh
from megatron_hybridnorm.models.gpt import specs as gpt_specs
from megatron_hybridnorm import compat

if not compat.HAVE_HYBRID_MODEL:
    pytest.skip(f"megatron-core {compat.VERSION} has no HybridModel (it arrived in 0.18); "
                "test_versions.py checks the refusal", allow_module_level=True)

from helpers import SEQ, VOCAB, batch, build_gpt, randomize_norms, rel_err, tiny_config
from megatron_hybridnorm.check.builders import build_hybrid
from megatron_hybridnorm.models.hybrid import get_hybrid_stack_spec, pattern_layouts
from megatron_hybridnorm.models.hybrid.layouts import half
from megatron_hybridnorm.models.hybrid.layer_specs import pattern_layer_specs
from megatron_hybridnorm.inspect import detect_checkpoint, detect_scheme
from megatron_hybridnorm.schemes import LayerNorms, get_scheme
from test_moe import MOE

L = 4
GPT_LIKE = "*-" * L


def hybrid_name(gpt_name: str) -> str:
    """Where a GPT parameter lives in the ``*-`` HybridModel: layer i's attention half in
    hybrid layer 2i, its FFN half in 2i + 1; GPT's final_layernorm is the stack's final_norm."""
    m = re.match(r"decoder\.layers\.(\d+)\.(.*)", gpt_name)
    if m:
        i, rest = int(m.group(1)), m.group(2)
        attention = rest.startswith(("self_attention.", "input_layernorm.",
                                     "self_attn_output_layernorm."))
        return f"decoder.layers.{2 * i + (0 if attention else 1)}.{rest}"
    return gpt_name.replace("decoder.final_layernorm.", "decoder.final_norm.")


def gpt_and_hybrid(scheme, pattern=GPT_LIKE, **config):
    torch.manual_seed(0)
    gpt = build_gpt(tiny_config(num_layers=L, **config), scheme)
    randomize_norms(gpt)
    hyb = build_hybrid(tiny_config(num_layers=len(pattern), **config), scheme, pattern)
    theirs = dict(hyb.named_parameters())
    mine = {hybrid_name(n): p for n, p in gpt.named_parameters()}
    assert mine.keys() == theirs.keys(), mine.keys() ^ theirs.keys()
    with torch.no_grad():
        for n, p in mine.items():
            theirs[n].copy_(p)
    return gpt, hyb


def logits_and_grads(model):
    from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker

    destroy_moe_metrics_tracker()  # sized by the first model's layer count (MoE layers log)
    tokens, labels, pos = batch()
    model.zero_grad()
    logits = model(tokens, pos, None)
    model(tokens, pos, None, labels=labels).sum().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters()}


# ---- where the norms sit ------------------------------------------------------------------


@pytest.mark.parametrize("scheme", mh.SCHEMES)
@pytest.mark.parametrize("pattern", [GPT_LIKE, "*-|*-*-|*-", "*-*-*-|*-"])
def test_star_dash_pattern_layers_are_the_gpt_layers_halves(scheme, pattern):
    gpt = mh.get_scheme(scheme).layouts(L)
    placed = pattern_layouts(scheme, pattern)
    assert [p.symbol for p in placed] == list("*-" * L)
    assert [p.block for p in placed] == [i // 2 for i in range(2 * L)]
    for i, lay in enumerate(gpt):
        attn, ffn = placed[2 * i].norms, placed[2 * i + 1].norms
        # the two halves together are the GPT layer, field by field
        assert LayerNorms(**{k: getattr(attn, k) or getattr(ffn, k)
                             for k in LayerNorms.__dataclass_fields__}) == lay
        assert not (attn.pre_mlp or attn.post_mlp or ffn.input or ffn.has_head_norms)


def test_hybridnorm_star_block_is_the_models_first_attention_and_mlp_whatever_the_split():
    hn, pre = mh.schemes.HYBRID, mh.schemes.PRE_NORM
    for pattern in ("MM*-M*-|*-", "MM|*-M*-*-", "M|M*|-*-"):  # (an M inside block 0 is refused)
        placed = pattern_layouts("hybridnorm_star", pattern)
        first = pattern.replace("|", "").index("*")
        mlp = pattern.replace("|", "").index("-", first)
        for i, p in enumerate(placed):
            if p.symbol == "M":
                assert p.norms is None
            elif i in (first, mlp):  # Pre-Norm, and the attention keeps its Q/K/V norms
                want = half(mh.schemes.HYBRID_FIRST, p.symbol)
                assert p.norms == want and p.block == 0, (pattern, i)
            else:
                assert p.norms == half(hn, p.symbol), (pattern, i)
    assert half(mh.schemes.HYBRID_FIRST, "*") == LayerNorms(input=True, q=True, k=True, v=True)
    assert half(pre, "-") == LayerNorms(pre_mlp=True)


def test_mixln_post_norm_blocks_are_the_first_quarter_of_attention_blocks():
    placed = pattern_layouts("mixln", "*-*-|*-*-*-*-|*-*-")  # 8 blocks: 2 Post-Norm
    post = half(mh.schemes.POST_NORM, "-")
    assert [p.norms == post for p in placed if p.symbol == "-"] == [True] * 2 + [False] * 6
    placed = pattern_layouts("mixln", GPT_LIKE, mixln_fraction=0.5)
    assert [p.block for p in placed if p.norms == post] == [0, 1]


@pytest.mark.parametrize("scheme,pattern,message", [
    ("hybridnorm_star", "M-M-", "has no attention layer"),
    ("hybridnorm_star", "**-*-", "block 0 (the attention layer 0) needs exactly one MLP/MoE"),
    ("hybridnorm_star", "*M*-", "block 0 (the attention layer 0) needs exactly one MLP/MoE"),
    ("hybridnorm_star", "*--*-", "and has 2"),
    ("hybridnorm_star", "-*-", "the MLP/MoE layer 0 comes before the first attention layer"),
    # a Mamba or gated delta net layer inside a special block (between its attention and MLP)
    ("hybridnorm_star", "*M-*-", "have megatron-core's 'M' layer 1 between them"),
    ("hybridnorm_star", "*G-*-", "have megatron-core's 'G' layer 1 between them"),
    ("mixln", "*-*-*M-*-*-*-*-*-", "block 2's attention layer 4 and its MLP/MoE layer 6"),
    ("mixln", "M-*-*-*-*-", "the MLP/MoE layer 1 comes before the first attention layer"),
    ("hybridnorm", "*-*-/*-", "multi-token prediction"),
    ("hybridnorm", "D-D-", "DeepSeek sparse attention"),
    ("hybridnorm", "*-x-", "unknown layer symbols ['x']"),
    ("hybridnorm", "", "is empty"),
])
def test_ambiguous_or_unsupported_patterns_are_refused(scheme, pattern, message):
    with pytest.raises(mh.SchemeConfigError, match=re.escape(message)):
        get_hybrid_stack_spec(tiny_config(), scheme, pattern,
                              **({"mixln_fraction": 0.5} if scheme == "mixln" else {}))


def test_mamba_layers_outside_the_special_blocks_are_allowed():
    for scheme, pattern in (("hybridnorm_star", "*-M*-"), ("hybridnorm_star", "*-*M-"),
                            ("mixln", "*-M*-*M-*-")):
        placed = pattern_layouts(scheme, pattern)
        assert [p.symbol for p in placed] == list(pattern)


def test_position_free_schemes_take_any_pattern():
    placed = pattern_layouts("hybridnorm", "-M*M*-")
    assert [p.norms for p in placed] == [half(mh.schemes.HYBRID, "-"), None,
                                         half(mh.schemes.HYBRID, "*"), None,
                                         half(mh.schemes.HYBRID, "*"), half(mh.schemes.HYBRID, "-")]


@pytest.mark.parametrize("scheme", mh.SCHEMES)
def test_the_stack_spec_takes_a_name_or_the_scheme(scheme):
    """Resolved once at the top: a Scheme builds the stack spec its name builds."""
    pattern = "*-*-*-*-"
    by_name = get_hybrid_stack_spec(tiny_config(), scheme, pattern)
    assert repr(get_hybrid_stack_spec(tiny_config(), mh.get_scheme(scheme), pattern)) == \
        repr(by_name)
    assert pattern_layouts(mh.get_scheme(scheme), pattern) == pattern_layouts(scheme, pattern)


def test_mamba_pattern_structure():
    """``M-M*-M-M*-``: our attention and MLP layers between megatron-core's Mamba layers (which
    need mamba-ssm and CUDA to build; see the GPU test below)."""
    pattern = "M-M*-M-M*-"
    specs = pattern_layer_specs(tiny_config(num_layers=10), get_scheme("hybridnorm"), pattern)
    assert sorted(specs) == [i for i, s in enumerate(pattern) if s != "M"]
    for i, spec in specs.items():
        sub = spec.submodules
        if pattern[i] == "*":  # no input norm, per-head Q/K/V norms, no FFN
            att = sub.self_attention.submodules
            assert sub.input_layernorm is gpt_specs.IdentityOp and sub.mlp is gpt_specs.IdentityOp
            assert att.q_layernorm is att.k_layernorm is att.v_layernorm is mh.norms.HeadNorm
        else:  # n = N(x); out = n + FFN(n), no attention
            assert sub.self_attention is gpt_specs.IdentityOp
            assert sub.pre_mlp_layernorm is mh.norms.PostNorm
    stack = get_hybrid_stack_spec(tiny_config(num_layers=10), "hybridnorm", pattern)
    from megatron.core.ssm.mamba_layer import MambaLayer

    assert stack.submodules.mamba_layer.module is MambaLayer
    assert stack.submodules.final_norm is mh.norms.Norm


def _mamba_ready() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA device"
    if not gpt_specs.HAVE_TE:
        return "needs Transformer Engine (megatron-core's Mamba layer uses its linears)"
    try:
        import mamba_ssm  # noqa: F401
    except ImportError:
        return "needs mamba-ssm"
    return None


@pytest.mark.gpu
@pytest.mark.skipif(_mamba_ready() is not None, reason=str(_mamba_ready()))
def test_mamba_pattern_runs_on_gpu(megatron_single_rank):
    pattern = "M*-M*-M-M-"  # HybridNorm*'s block: layers 1 and 2
    # d_inner 128 in 16 heads of 8 over 2 groups: the sizes megatron-core's Mamba mixer accepts
    config = tiny_config(num_layers=len(pattern), params_dtype=torch.bfloat16, bf16=True,
                         mamba_head_dim=8, mamba_num_groups=2, mamba_state_dim=16)
    model = build_hybrid(config, "hybridnorm_star", pattern, use_transformer_engine=True).cuda()
    tokens, labels, pos = batch(device="cuda")
    loss = model(tokens, pos, None, labels=labels).float().mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters())
    found = detect_scheme(model)
    assert (found.scheme, found.pattern) == ("hybridnorm_star", pattern)


# ---- the same model as GPTModel -----------------------------------------------------------


@pytest.mark.parametrize("scheme", mh.SCHEMES)
def test_star_dash_hybrid_model_equals_the_gpt_model(megatron_single_rank, scheme):
    gpt, hyb = gpt_and_hybrid(scheme)
    lg, gg = logits_and_grads(gpt)
    lh, gh = logits_and_grads(hyb)
    assert rel_err(lh, lg) < 1e-5
    errs = {n: rel_err(gh[hybrid_name(n)], g) for n, g in gg.items()}
    assert max(errs.values()) < 1e-5, errs
    assert any("layernorm" in n for n in errs) and len(errs) == len(gh)


@pytest.mark.parametrize("scheme", mh.SCHEMES)
def test_star_e_hybrid_model_equals_the_gpt_moe_model(megatron_single_rank, scheme):
    moe = {**MOE, "moe_layer_freq": 1}
    gpt, hyb = gpt_and_hybrid(scheme, "*E" * L, **moe)
    lg, gg = logits_and_grads(gpt)
    lh, gh = logits_and_grads(hyb)
    assert rel_err(lh, lg) < 1e-5
    errs = {n: rel_err(gh[hybrid_name(n)], g) for n, g in gg.items()}
    assert max(errs.values()) < 1e-5, errs
    assert any(".router." in n for n in errs)


@pytest.mark.parametrize("scheme", mh.SCHEMES)
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_te_pattern_layers_are_the_te_gpt_layers_halves(monkeypatch, scheme, moe):
    """On Transformer Engine (its classes are megatron-core's stand-ins where TE is missing):
    each '*' layer holds the TE GPT layer's attention slots, each '-'/'E' layer its FFN slots
    (pre-norms fused into the next linear alike), and the final norm is TE's."""
    from test_specs import kind
    from test_te_spec import te_slots

    monkeypatch.setattr(gpt_specs, "HAVE_TE", True)
    extra = {**MOE, "moe_layer_freq": 1} if moe else {}
    gpt = mh.get_decoder_block_spec(tiny_config(num_layers=L, **extra), scheme,
                                    use_transformer_engine=True).layer_specs
    pattern = ("*E" if moe else "*-") * L
    hyb = pattern_layer_specs(tiny_config(num_layers=2 * L, **extra), get_scheme(scheme), pattern,
                              use_transformer_engine=True)
    for i, spec in enumerate(gpt):
        want = te_slots(spec)
        att, ffn = hyb[2 * i].submodules, hyb[2 * i + 1].submodules
        a = att.self_attention.submodules
        assert dict(input=att.input_layernorm, qkv=a.linear_qkv, core=a.core_attention,
                    proj=a.linear_proj, q=kind(a.q_layernorm), k=kind(a.k_layernorm),
                    v=kind(a.v_layernorm), attn_out=att.self_attn_output_layernorm) == {
            k: want[k] for k in ("input", "qkv", "core", "proj", "q", "k", "v", "attn_out")
        }, (scheme, i)
        fc = ffn.mlp
        fc = (fc.keywords["submodules"].linear_fc1, fc.keywords["submodules"].linear_fc2) \
            if not moe else ("moe",)
        assert (ffn.pre_mlp_layernorm, fc, ffn.mlp_output_layernorm, ffn.post_mlp_layernorm) == (
            want["pre_mlp"], want["fc"], want["mlp_out"], want["post_mlp"]), (scheme, i)
        keys = {**att.sharded_state_dict_keys_map, **ffn.sharded_state_dict_keys_map}
        assert keys == spec.submodules.sharded_state_dict_keys_map
    stack = get_hybrid_stack_spec(tiny_config(num_layers=2 * L, **extra), scheme, pattern,
                                  use_transformer_engine=True)
    assert stack.submodules.final_norm is mh.norms.te.InterchangeableTENorm


def test_in_linear_ffn_norm_is_refused_with_moe_layers(monkeypatch):
    monkeypatch.setattr(gpt_specs, "HAVE_TE", True)
    with pytest.raises(mh.SchemeConfigError, match='te_ffn_norm="in_linear" puts the norm'):
        get_hybrid_stack_spec(tiny_config(num_layers=4, **{**MOE, "moe_layer_freq": 1}),
                              "hybridnorm", "*E*E", use_transformer_engine=True,
                              te_ffn_norm="in_linear")


def test_moe_pattern_needs_experts():
    with pytest.raises(mh.SchemeConfigError, match="set num_moe_experts"):
        get_hybrid_stack_spec(tiny_config(), "hybridnorm", "*E*E")


@pytest.mark.skipif(gpt_specs.HAVE_TE, reason="Transformer Engine is installed")
def test_te_backend_without_te_names_the_fix():
    with pytest.raises(mh.SchemeConfigError, match="use_transformer_engine=False"):
        get_hybrid_stack_spec(tiny_config(), "hybridnorm", GPT_LIKE, use_transformer_engine=True)


def test_a_stack_built_for_another_pattern_is_refused(megatron_single_rank):
    from megatron.core.models.hybrid.hybrid_model import HybridModel

    config = tiny_config(num_layers=4)
    spec = get_hybrid_stack_spec(config, "hybridnorm", "*-*-")
    with pytest.raises(mh.SchemeConfigError, match="built for another pattern"):
        HybridModel(config=config, hybrid_stack_spec=spec, vocab_size=VOCAB,
                    max_sequence_length=SEQ, hybrid_layer_pattern="*E*-")


# ---- inspect and checkpoints --------------------------------------------------------------


@pytest.mark.parametrize("scheme", mh.SCHEMES)
def test_inspect_names_the_scheme_of_a_hybrid_model_and_its_checkpoint(
        megatron_single_rank, tmp_path, scheme):
    from megatron.core import dist_checkpointing

    pattern = "*-*-*-*-*-*-*-*-"
    model = build_hybrid(tiny_config(num_layers=len(pattern)), scheme, pattern)
    found = detect_scheme(model)
    assert (found.scheme, found.pattern) == (scheme, pattern)
    dist_checkpointing.save(model.sharded_state_dict(), str(tmp_path))
    found = detect_checkpoint(tmp_path)
    assert (found.scheme, found.pattern) == (scheme, pattern)
    assert "HybridModel, pattern" in str(found)
    if scheme.startswith("mixln"):
        assert "2 Post-Norm blocks" in str(found)


def test_hybrid_checkpoint_of_another_scheme_is_refused(megatron_single_rank, tmp_path):
    from megatron.core import dist_checkpointing

    from megatron_hybridnorm.inspect import check_checkpoint

    saved = build_hybrid(tiny_config(num_layers=4), "hybridnorm", "*-*-")
    dist_checkpointing.save(saved.sharded_state_dict(), str(tmp_path))
    other = build_hybrid(tiny_config(num_layers=4), "prenorm", "*-*-")
    with pytest.raises(mh.SchemeMismatchError, match="holds hybridnorm"):
        check_checkpoint(other, tmp_path)


def test_each_hybrid_layer_checks_its_half_of_the_saved_layout_as_it_loads(megatron_single_rank):
    """The guard at load time, past check_checkpoint: a pattern layer compares its own half of
    the layout a layer saved (a GPT layer's whole layout loads into either half)."""
    from dataclasses import asdict

    from megatron_hybridnorm.schemes import get_scheme

    model = build_hybrid(tiny_config(num_layers=4), "hybridnorm", "*-*-")
    attn, ffn = model.decoder.layers[0], model.decoder.layers[1]
    gpt_layout = asdict(get_scheme("hybridnorm").body)
    attn.set_extra_state({"norms": gpt_layout})  # both halves of the GPT layer's: accepted
    ffn.set_extra_state({"norms": gpt_layout})
    other = asdict(get_scheme("prenorm").body)
    with pytest.raises(mh.SchemeMismatchError, match=r"hybrid layer 0 \('\*'\) of the "
                                                           r"checkpoint has the norms"):
        attn.set_extra_state({"norms": other})
    with pytest.raises(mh.SchemeMismatchError, match=r"hybrid layer 1 \('-'\)"):
        ffn.set_extra_state({"norms": other})


needs_interop = pytest.mark.skipif(
    not compat.HAVE_GPT_CHECKPOINT_INTEROP,
    reason=f"megatron-core {compat.VERSION} has no gpt_checkpoint_interop (it arrived in 0.19)")


@pytest.mark.parametrize("scheme", ["hybridnorm", "hybridnorm_star", "mixln", "postnorm",
                                    "periln", "olmo2", "prenorm_lns", "deepnorm"])
@needs_interop
def test_gpt_checkpoint_loads_into_the_hybrid_model(megatron_single_rank, tmp_path, scheme):
    """Stacked (Pre-Norm, Post-Norm, HybridNorm) and per-layer (HybridNorm*, Mix-LN) GPT
    checkpoints: megatron-core's translation for the first, ours for the second."""
    from megatron.core import dist_checkpointing

    from megatron_hybridnorm.models.hybrid.gpt_checkpoint import load_gpt_checkpoint

    gpt, _ = gpt_and_hybrid(scheme)
    dist_checkpointing.save(gpt.sharded_state_dict(), str(tmp_path))
    hyb = build_hybrid(tiny_config(num_layers=2 * L), scheme, GPT_LIKE)
    tokens, labels, pos = batch()
    before = hyb(tokens, pos, None, labels=labels).mean().item()
    load_gpt_checkpoint(hyb, tmp_path, GPT_LIKE)
    want = gpt(tokens, pos, None, labels=labels).mean().item()
    got = hyb(tokens, pos, None, labels=labels).mean().item()
    assert abs(got - want) <= 1e-6 * abs(want) and abs(before - want) > 1e-3
    other = build_hybrid(tiny_config(num_layers=2 * L), "prenorm_qknorm", GPT_LIKE)
    with pytest.raises(mh.SchemeMismatchError, match="build it with the checkpoint's"):
        load_gpt_checkpoint(other, tmp_path, GPT_LIKE)


@needs_interop
def test_converted_gpt_checkpoint_saves_and_loads_as_a_hybrid_checkpoint(megatron_single_rank,
                                                                          tmp_path):
    """GPT checkpoint -> load_gpt_checkpoint -> save: a hybrid dist checkpoint that loads into a
    fresh HybridModel the way Megatron-LM's --load does (its sharded state dict, strict)."""
    from megatron.core import dist_checkpointing

    from megatron_hybridnorm.models.hybrid.gpt_checkpoint import load_gpt_checkpoint

    gpt, _ = gpt_and_hybrid("hybridnorm_star")
    (tmp_path / "gpt").mkdir()
    dist_checkpointing.save(gpt.sharded_state_dict(), str(tmp_path / "gpt"))
    hyb = build_hybrid(tiny_config(num_layers=2 * L), "hybridnorm_star", GPT_LIKE)
    load_gpt_checkpoint(hyb, tmp_path / "gpt", GPT_LIKE)
    (tmp_path / "hybrid").mkdir()
    dist_checkpointing.save(hyb.sharded_state_dict(), str(tmp_path / "hybrid"))
    assert detect_checkpoint(tmp_path / "hybrid").pattern == GPT_LIKE
    fresh = build_hybrid(tiny_config(num_layers=2 * L), "hybridnorm_star", GPT_LIKE)
    fresh.load_state_dict(dist_checkpointing.load(fresh.sharded_state_dict(),
                                                  str(tmp_path / "hybrid")))
    tokens, labels, pos = batch()
    want = gpt(tokens, pos, None, labels=labels).mean().item()
    assert abs(fresh(tokens, pos, None, labels=labels).mean().item() - want) <= 1e-6 * abs(want)


# ---- Megatron-LM's pretrain_hybrid.py -----------------------------------------------------


def build_like_pretrain_hybrid(scheme, pattern, **config):
    """What pretrain_hybrid.py does with --spec megatron_hybridnorm.hybrid.entrypoints <scheme>
    --hybrid-layer-pattern <pattern>: megatron-core 0.19's HybridModelBuilder; before it (0.18),
    Megatron-LM's hybrid_builders.py hands the imported object to HybridModel."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    spec = compat.import_module(("megatron_hybridnorm.hybrid.entrypoints", scheme))
    transformer = tiny_config(num_layers=len(pattern), **config)
    try:
        from megatron.training.models.hybrid import HybridModelBuilder, HybridModelConfig
    except ImportError:  # megatron-core 0.18: hybrid_builders.hybrid_builder
        from megatron.core.models.hybrid.hybrid_model import HybridModel

        return HybridModel(config=transformer, hybrid_stack_spec=spec, vocab_size=VOCAB,
                           max_sequence_length=SEQ, hybrid_layer_pattern=pattern,
                           position_embedding_type="rope")
    cfg = HybridModelConfig(transformer=transformer, hybrid_stack_spec=spec,
                            hybrid_layer_pattern=pattern, vocab_size=VOCAB, seq_length=SEQ,
                            position_embedding_type="rope")
    return HybridModelBuilder(cfg).build_model(ProcessGroupCollection.use_mpu_process_groups(),
                                               vp_stage=None)


@pytest.fixture
def megatron_lm_args(monkeypatch):
    """Megatron-LM's global arguments, as pretrain_hybrid.py sets them before building."""
    import argparse

    from megatron.training import global_vars

    def set_args(**kw):
        monkeypatch.setattr(global_vars, "_GLOBAL_ARGS", argparse.Namespace(**{"load": None, **kw}))

    return set_args


@pytest.mark.parametrize("scheme", mh.SCHEMES)
def test_pretrain_hybrid_builds_every_entry_point(megatron_single_rank, megatron_lm_args, capsys,
                                                  scheme):
    megatron_lm_args(hybrid_layer_pattern=GPT_LIKE)
    model = build_like_pretrain_hybrid(scheme, GPT_LIKE, transformer_impl="local")
    tokens, labels, pos = batch()
    assert torch.isfinite(model(tokens, pos, None, labels=labels)).all()
    out = capsys.readouterr().out
    assert (f"megatron-hybridnorm: built {scheme} hybrid stack on local modules, pattern "
            f"'{GPT_LIKE}', 8 layers on this stage (8 with the scheme's norms)") in out
    assert detect_scheme(model).scheme == scheme


def test_pretrain_hybrid_entry_point_options_and_load_check(
        megatron_single_rank, megatron_lm_args, monkeypatch, capsys, tmp_path):
    from megatron.core import dist_checkpointing

    monkeypatch.setenv("HYBRIDNORM_QKV_NORM", "full")
    model = build_like_pretrain_hybrid("hybridnorm_star", GPT_LIKE, transformer_impl="local")
    assert "(qkv_norm=full) hybrid stack" in capsys.readouterr().out
    assert detect_scheme(model).qkv_norm == "full"
    dist_checkpointing.save(model.sharded_state_dict(), str(tmp_path))
    monkeypatch.delenv("HYBRIDNORM_QKV_NORM")
    megatron_lm_args(hybrid_layer_pattern=GPT_LIKE, load=str(tmp_path))
    with pytest.raises(mh.SchemeMismatchError,
                       match="--spec megatron_hybridnorm.hybrid.entrypoints hybridnorm "):
        build_like_pretrain_hybrid("hybridnorm", GPT_LIKE, transformer_impl="local")


def test_pretrain_hybrid_says_fsdp_with_tp_is_untested(megatron_single_rank, megatron_lm_args,
                                                      capsys):
    megatron_lm_args(hybrid_layer_pattern=GPT_LIKE, use_torch_fsdp2=True)
    build_like_pretrain_hybrid("hybridnorm", GPT_LIKE, transformer_impl="local",
                               tensor_model_parallel_size=2)
    assert "--use-torch-fsdp2 with tensor parallelism is untested" in capsys.readouterr().out


def test_pretrain_hybrid_without_te_names_the_flag(megatron_single_rank, megatron_lm_args):
    if gpt_specs.HAVE_TE:
        pytest.skip("Transformer Engine is installed")
    megatron_lm_args(hybrid_layer_pattern=GPT_LIKE)
    with pytest.raises(mh.SchemeConfigError, match="--transformer-impl local"):
        build_like_pretrain_hybrid("hybridnorm", GPT_LIKE)


# ---- parallel HybridModel against one rank (gloo) -----------------------------------------

L8 = {"num_layers": 8}
SCHEMES_TP = ("hybridnorm", "hybridnorm_star", "mixln", "postnorm_official", "periln",
              "deepnorm")
TP_SP = [dict(scheme=s, pattern="*-" * 4, config=L8, microbatches=2, sp=True) for s in SCHEMES_TP]
PP = [dict(scheme=s, pattern=p, config=L8, microbatches=4)
      for s, p in (("hybridnorm", "*-*-|*-*-"), ("hybridnorm_star", "*-*-|*-*-"),
                   ("hybridnorm_star", "*|-*-*-*-"), ("mixln", "*-*-*-|*-"),
                   ("hybridnorm_star", "*-*E|*E*E"), ("prenorm_lns", "*-*|-*-*-"))]
for c in PP:
    if "E" in c["pattern"]:  # MoE layers: the same slots as dense ones
        c["config"] = {**L8, **MOE, "moe_layer_freq": 1}


def one_rank(case):
    return dict(case, pattern=case["pattern"].replace("|", ""), sp=False)


@pytest.fixture(scope="module")
def parallel_runs():
    from launcher import Parallel, run_distributed

    import dist_cases

    run = lambda cases, world, layout: run_distributed(  # noqa: E731
        dist_cases.train_cases, world, layout, args=(cases,), timeout=900)
    cases = TP_SP + PP
    one = run([one_rank(c) for c in cases], 1, Parallel())[0]
    return {"one": dict(zip(map(id, cases), one)), "tp2": run(TP_SP, 2, Parallel(tp=2)),
            "pp2": run(PP, 2, Parallel(pp=2))}


@pytest.mark.slow
@pytest.mark.parametrize("i", range(len(TP_SP)), ids=SCHEMES_TP)
def test_hybrid_tp2_sp_matches_one_rank(parallel_runs, i):
    from test_tensor_parallel import assert_same_training

    assert_same_training(parallel_runs["one"][id(TP_SP[i])], [r[i] for r in parallel_runs["tp2"]])


# what each global layer's norm slots hold: (input, q, k, v, attention output, pre-MLP, FFN
# output, post-MLP, depth scale)
N, P, H, I = "Norm", "PostNorm", "HeadNorm", "IdentityOp"
ATT = {"hybridnorm": (I, H, H, H, I, I, I, I, None), "first": (N, H, H, H, I, I, I, I, None)}
FFN = {"hybridnorm": (I, None, None, None, I, P, I, I, None),
       "first": (I, None, None, None, I, N, I, I, None),
       "post": (I, None, None, None, I, P, I, N, None),
       "pre": (I, None, None, None, I, N, I, I, None)}


@pytest.mark.slow
@pytest.mark.parametrize("i", range(len(PP)), ids=[f"{c['scheme']}-{c['pattern']}" for c in PP])
def test_hybrid_pp2_matches_one_rank_with_special_blocks_global(parallel_runs, i):
    from test_tensor_parallel import assert_same_training

    case, ranks = PP[i], [r[i] for r in parallel_runs["pp2"]]
    assert_same_training(parallel_runs["one"][id(case)], ranks)
    stages = [sorted(r["slots"]) for r in ranks]
    cut = case["pattern"].index("|")
    assert stages == [list(range(cut)), list(range(cut, 8))]  # the '|' split, uneven included
    slots = {k: v for r in ranks for k, v in r["slots"].items()}
    if case["scheme"] == "hybridnorm_star":
        want = [ATT["first"], FFN["first"]] + [ATT["hybridnorm"], FFN["hybridnorm"]] * 3
    elif case["scheme"] == "mixln":  # 4 blocks: the first Post-Norm
        want = [(I, None, None, None, I, I, I, I, None), FFN["post"]] + [
            (N, None, None, None, I, I, I, I, None), FFN["pre"]] * 3
    elif case["scheme"] == "prenorm_lns":  # block b's two layers scale by 1/sqrt(b + 1)
        want = [lay + (round(1 / (b + 1) ** 0.5, 6),) for b in range(4)
                for lay in ((N, None, None, None, I, I, I, I), FFN["pre"][:-1])]
    else:
        want = [ATT["hybridnorm"], FFN["hybridnorm"]] * 4
    assert [slots[k] for k in range(8)] == want


@pytest.mark.slow
@needs_interop
def test_gpt_checkpoint_saved_at_tp2_pp2_loads_into_the_hybrid_model(tmp_path):
    from launcher import Parallel, run_distributed

    import dist_cases

    cases = [dict(scheme=s, config={"num_layers": 4}) for s in
             ("hybridnorm", "hybridnorm_star", "mixln", "prenorm", "prenorm_lns", "periln")]
    saved = run_distributed(dist_cases.save_and_eval, 4, Parallel(tp=2, pp=2),
                            args=([dict(c, sp=True) for c in cases], str(tmp_path)),
                            timeout=900)[0]
    loaded = run_distributed(dist_cases.load_gpt_into_hybrid_and_eval, 1, Parallel(),
                             args=(cases, str(tmp_path), GPT_LIKE), timeout=900)[0]
    for case, a, b in zip(cases, saved, loaded):
        assert abs(a - b) <= 1e-5 * abs(a), (case, a, b)
