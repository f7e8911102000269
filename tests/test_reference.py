"""Every scheme's GPTModel against the independent float64 reference: logits and every gradient."""

import re

import pytest
import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

import megatron_hybridnorm as mh
from helpers import SEQ, batch, build_gpt, randomize_norms, rel_err, tiny_config
import reference

TOL = 1e-5
# DyT's Q/K norm parameters get gradients of about 1e-7 (with_attention_signal): float32 sums of
# them came to 1.1e-5 and 1.5e-5 of the float64 reference on an Intel Xeon (2026-12-07), under
# 1e-5 on the AMD EPYC that CI ran on before. A wrong placement is off by far more (the negative
# controls below: 1e-2 and up).
TOL_DYT = 3e-5


def compare_to_reference(model, scheme, config, ref_scheme=None, **ref_options):
    """Max relative error of Megatron (fp32) against the fp64 reference, over logits, loss and
    the gradient of every parameter. Returns (worst error, {name: error}). The model runs on the
    device of its parameters, the reference on the CPU."""
    device = next(model.parameters()).device
    tokens, labels, pos = batch(device=device)
    model.zero_grad()
    with torch.device(device):  # what Megatron allocates without naming a device
        logits = model(tokens, pos, None)
        loss = model(tokens, pos, None, labels=labels)
        loss.sum().backward()
    tokens, labels = tokens.cpu(), labels.cpu()

    ref_options.setdefault("qkv_norm", mh.get_scheme(ref_scheme or scheme).qkv_norm)
    params = {n: p.detach().double().cpu().requires_grad_(True)
              for n, p in model.named_parameters()}
    rcfg = reference.RefConfig(
        hidden=config.hidden_size,
        heads=config.num_attention_heads,
        groups=config.num_query_groups,
        layers=config.num_layers,
        ffn=config.ffn_hidden_size,
        eps=config.layernorm_epsilon,
        rope_base=500000,
        normalization=config.normalization,
        zero_centered=config.layernorm_zero_centered_gamma,
        **ref_options,
    )
    ref_logits, ref_loss = reference.forward(ref_scheme or scheme, tokens, labels, params, rcfg)
    ref_loss.sum().backward()

    errs = {"logits": rel_err(logits, ref_logits), "loss": rel_err(loss, ref_loss)}
    for n, p in model.named_parameters():
        ref_grad = params[n].grad  # None: the reference's equations never use this parameter
        errs[n] = float("inf") if ref_grad is None else rel_err(p.grad, ref_grad)
    return max(errs.values()), errs


CASES = [(s, mh.get_scheme(s).qkv_norm, "RMSNorm") for s in mh.SCHEMES] + [
    ("olmo2", "head", "RMSNorm"),
    ("periln", "head", "LayerNorm"),
    ("hybridnorm", "full", "RMSNorm"),
    ("hybridnorm_star", "full", "RMSNorm"),
    ("hybridnorm", "head", "LayerNorm"),
    ("postnorm", "head", "LayerNorm"),
    # DyT in place of every norm, on placements with every kind of slot
    ("hybridnorm_star", "head", "DyT"),
    ("hybridnorm", "full", "DyT"),
    ("periln", "head", "DyT"),
    ("olmo2", "full", "DyT"),
    ("postnorm", "head", "DyT"),
    ("deepnorm", "head", "DyT"),
]


def with_attention_signal(model):
    """DyT does not rescale: in the tiny test model the residual stream and q, k then stay near
    1e-3, attention is uniform and the Q/K norms' gradients are about 1e-10, below float32's
    noise. Larger embeddings and QKV weights make the attention depend on q and k (gradients
    about 1e-7, compared to 1e-5 as all others)."""
    with torch.no_grad():
        model.embedding.word_embeddings.weight.mul_(30.0)
        for layer in model.decoder.layers:
            layer.self_attention.linear_qkv.weight.mul_(10.0)


@pytest.mark.parametrize("scheme,qkv_norm,normalization", CASES)
def test_matches_reference(megatron_single_rank, scheme, qkv_norm, normalization):
    torch.manual_seed(0)
    config = tiny_config(normalization=normalization)
    options = {"qkv_norm": qkv_norm} if mh.get_scheme(scheme).has_head_norms else {}
    model = build_gpt(config, scheme, **options)
    randomize_norms(model)
    if normalization == "DyT":
        with_attention_signal(model)
    worst, errs = compare_to_reference(model, scheme, config, qkv_norm=qkv_norm)
    tol = TOL_DYT if normalization == "DyT" else TOL
    assert worst < tol, {k: v for k, v in errs.items() if v >= tol}
    # the comparison covered every parameter, norms included
    assert any("v_layernorm" in k for k in errs) == (scheme.startswith("hybridnorm"))


def test_zero_centered_gamma_matches_reference(megatron_single_rank):
    torch.manual_seed(0)
    config = tiny_config(layernorm_zero_centered_gamma=True)
    model = build_gpt(config, "hybridnorm_star")
    randomize_norms(model)
    with torch.no_grad():  # stored weights are gamma - 1
        for n, p in model.named_parameters():
            if "layernorm" in n:
                p.sub_(1.0)
    worst, errs = compare_to_reference(model, "hybridnorm_star", config)
    assert worst < TOL, errs


def test_mixln_fraction_option_matches_reference(megatron_single_rank):
    torch.manual_seed(0)
    config = tiny_config()
    model = build_gpt(config, "mixln", mixln_fraction=0.5)
    randomize_norms(model)
    worst, errs = compare_to_reference(model, "mixln", config, mixln_fraction=0.5)
    assert worst < TOL, errs
    assert [type(l.post_mlp_layernorm).__name__ for l in model.decoder.layers] == [
        "Norm", "Norm", "IdentityOp", "IdentityOp"
    ]


def test_negative_control_moved_norm_is_caught(megatron_single_rank):
    """HybridNorm with its FFN residual taken BEFORE the norm (y, not N(y)) must not pass."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
    from megatron.core.models.gpt import GPTModel
    from helpers import SEQ, VOCAB

    torch.manual_seed(0)
    config = tiny_config()
    wrong = mh.LayerNorms(q=True, k=True, v=True, pre_mlp=True, pre_mlp_is_residual=False)
    spec = TransformerBlockSubmodules(
        layer_specs=[mh.get_layer_spec(wrong)] * config.num_layers,
        layer_norm=mh.norms.Norm,
    )
    model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=VOCAB,
                     max_sequence_length=SEQ, position_embedding_type="rope", rotary_base=500000)
    randomize_norms(model)
    worst, _ = compare_to_reference(model, "hybridnorm", config)
    assert worst > 1e-2


def test_negative_control_wrong_reference_scheme_is_caught(megatron_single_rank):
    """The comparison tells HybridNorm from HybridNorm* (they differ only in block 0)."""
    torch.manual_seed(0)
    config = tiny_config()
    model = build_gpt(config, "hybridnorm_star")
    randomize_norms(model)
    worst, _ = compare_to_reference(model, "hybridnorm_star", config, ref_scheme="hybridnorm")
    assert worst > 1e-2


def test_official_post_norm_is_the_textbook_one_inside(megatron_single_rank):
    """The docs' claim: chained, the official Post-Norm (x = N(x); x = x + F(x)) computes the
    textbook N(x + F(x)) inside the stack. With the same weights (the textbook layer i's
    post-FFN norm is the official layer i+1's input norm) and the textbook stack fed the
    official one's normalized embeddings, every textbook layer's output equals the next official
    layer's normalized input. The ends differ (the official embedding norm; the textbook
    double norm at the end), which is why the two are separate schemes."""
    from megatron.core.transformer.transformer_block import TransformerBlock

    torch.manual_seed(0)
    cfg = tiny_config()
    official = TransformerBlock(cfg, mh.get_decoder_block_spec(cfg, "postnorm_official"))
    textbook = TransformerBlock(cfg, mh.get_decoder_block_spec(cfg, "postnorm"))
    with torch.no_grad():
        for p in official.parameters():
            p.normal_(1.0 if p.dim() == 1 else 0.0, 0.3 if p.dim() == 1 else 0.05)
        src = dict(official.named_parameters())
        for name, p in textbook.named_parameters():
            m = re.match(r"layers\.(\d+)\.post_mlp_layernorm\.(.*)", name)
            if m and int(m.group(1)) + 1 < cfg.num_layers:
                name = f"layers.{int(m.group(1)) + 1}.input_layernorm.{m.group(2)}"
            elif m:  # the textbook's extra last norm: no official counterpart
                continue
            p.copy_(src[name])
    inputs, outputs = {}, {}
    for i, layer in enumerate(official.layers):
        layer.input_layernorm.register_forward_hook(  # (n, n); n where megatron-core 0.16 runs
            lambda mod, a, out, i=i: inputs.__setitem__(i, (out[0] if isinstance(out, tuple)
                                                            else out).detach()))
    for i, layer in enumerate(textbook.layers):
        layer.register_forward_hook(
            lambda mod, a, out, i=i: outputs.__setitem__(i, (out[0] if isinstance(out, tuple)
                                                             else out).detach()))
    x = torch.randn(SEQ, 2, cfg.hidden_size)
    rope = RotaryEmbedding(kv_channels=cfg.kv_channels, rotary_percent=1.0,
                           rotary_base=500000)(SEQ)
    official(x, attention_mask=None, rotary_pos_emb=rope)
    textbook(inputs[0], attention_mask=None, rotary_pos_emb=rope)
    for i in range(cfg.num_layers - 1):
        assert rel_err(outputs[i], inputs[i + 1]) < 1e-6, i
    assert rel_err(inputs[0], x) > 0.1  # the official embedding norm is a real norm


@pytest.mark.parametrize("scheme,look_alike,qkv_norm", [
    ("prenorm_lns", "prenorm", None), ("deepnorm", "postnorm", None),
    ("periln", "prenorm", None)])
def test_negative_control_baselines_differ_from_their_look_alikes(megatron_single_rank, scheme,
                                                                   look_alike, qkv_norm):
    """The depth scale, DeepNorm's alpha and the output norms change the result: each fails
    against the reference of what it would be without them."""
    torch.manual_seed(0)
    config = tiny_config()
    model = build_gpt(config, scheme)
    randomize_norms(model)
    worst, _ = compare_to_reference(model, scheme, config, ref_scheme=look_alike,
                                    qkv_norm=qkv_norm or mh.get_scheme(scheme).qkv_norm)
    assert worst > 1e-2
