"""The Transformer Engine backend at run time (GPU + TE): TE in BF16 against the local backend with
the same weights, FP8 against BF16 after delayed scaling has warmed up, MoE with TE's grouped
GEMM, the three ``te_ffn_norm`` choices against the local backend, and checkpoints from one
backend loaded into the other. Logits and gradients are compared, not the loss (a random model's loss sits near
ln(vocab) whatever its weights). The weight-copying and comparing helpers run on the CPU too
(local into local: exact), so they are tested where TE is missing."""

import re

import pytest
import torch

import megatron_hybridnorm as mh
from megatron.core.extensions import transformer_engine as te_ext
from megatron_hybridnorm.inspect import layer_checkpoint_params
from helpers import SEQ, VOCAB, batch, randomize_norms, rel_err, tiny_config

HAVE_TE_AND_GPU = te_ext.HAVE_TE and torch.cuda.is_available()
te_gpu = pytest.mark.skipif(not HAVE_TE_AND_GPU,
                            reason="needs Transformer Engine and a CUDA device")
SCHEMES = list(mh.SCHEMES)
# BF16: TE may be at most this much, or 3x the local backend's own BF16 error, from an fp32 run
# of the same weights (differently fused kernels round differently; some gradients, like the
# q/k-norm weights', nearly cancel and lose digits in any BF16 path). FP8 E4M3 linears on random
# data: about 4% relative error each (H200, TE 2.20.2); through a 4-layer model logits move more.
BF16_FLOOR, FP8_TOL = 0.02, 0.15
_EXPERT = re.compile(r"mlp\.experts\.local_experts\.(\d+)\.(linear_fc[12])\.weight$")


def model_config(moe=False, **overrides):
    kw = dict(hidden_size=128, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=256,
              bf16=True, params_dtype=torch.bfloat16)
    if moe:
        kw.update(num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=256)
    kw.update(overrides)
    return tiny_config(**kw)


def build(scheme, *, te, device, moe=False, config=None, **options):
    from megatron.core.models.gpt import GPTModel

    cfg = config or model_config(moe=moe, moe_grouped_gemm=te and moe)
    with torch.device(device):
        spec = mh.get_decoder_block_spec(cfg, scheme, use_transformer_engine=te, **options)
        return GPTModel(config=cfg, transformer_layer_spec=spec, vocab_size=VOCAB,
                        max_sequence_length=SEQ, position_embedding_type="rope")


def checkpoint_params(model) -> dict:
    """Every parameter under its checkpoint name; TE's grouped experts (``weight{i}``) under the
    local experts' names."""
    out = {n: p for n, p in model.named_parameters() if not n.startswith("decoder.layers.")}
    for name, p in layer_checkpoint_params(model).items():
        m = re.match(r"(.*mlp\.experts)\.(linear_fc[12])\.weight(\d+)$", name)
        if m:
            name = f"{m.group(1)}.local_experts.{m.group(3)}.{m.group(2)}.weight"
        out[name] = p
    return out


def copy_weights(src, dst):
    """``dst`` gets ``src``'s weights, matched by checkpoint name; every parameter of both."""
    a, b = checkpoint_params(src), checkpoint_params(dst)
    assert set(a) == set(b), (sorted(set(a) - set(b)), sorted(set(b) - set(a)))
    with torch.no_grad():
        for name, p in a.items():
            b[name].copy_(p)


def logits_and_grads(model, steps=1):
    """Logits of the last of ``steps`` forward/backward passes (no optimizer step: the weights
    stay; FP8's delayed scaling sees its amax history fill) and the gradients by checkpoint
    name."""
    device = next(model.parameters()).device
    tokens, labels, pos = batch(device=device)
    for _ in range(steps):
        model.zero_grad()
        with torch.device(device):
            logits = model(tokens, pos, None)
            logits.float().square().mean().backward()
    return logits.detach().float(), {n: p.grad.float() for n, p in
                                     checkpoint_params(model).items() if p.grad is not None}


def errors(run, truth) -> dict:
    """Relative errors of a run's logits and of each gradient against ``truth``'s."""
    (logits, grads), (t_logits, t_grads) = run, truth
    assert set(grads) == set(t_grads)
    return {"logits": rel_err(logits, t_logits),
            **{n: rel_err(g, t_grads[n]) for n, g in grads.items()}}


def assert_close(got, want, tol, what):
    """Logits within ``tol`` of ``want``'s, every gradient within 3 * tol."""
    bad = {n: e for n, e in errors(got, want).items() if e >= (tol if n == "logits" else 3 * tol)}
    assert not bad, f"{what}: {bad}"


def assert_no_worse_than_local(te_run, local, scheme, what, moe=False):
    """TE's run against an fp32 local run of ``local``'s weights: within BF16_FLOOR, or within
    3x the error of ``local``'s own BF16 run, for the logits and every gradient."""
    truth = build(scheme, te=False, device=next(local.parameters()).device,
                  config=model_config(moe=moe, bf16=False, params_dtype=torch.float32))
    copy_weights(local, truth)
    truth_run = logits_and_grads(truth)
    te_err, local_err = errors(te_run, truth_run), errors(logits_and_grads(local), truth_run)
    bad = {n: (e, local_err[n]) for n, e in te_err.items()
           if e >= max(BF16_FLOOR, 3 * local_err[n])}
    assert not bad, f"{what}: (TE error, local BF16 error) {bad}"


def test_helpers_copy_and_compare_on_the_cpu(megatron_single_rank):
    """Local into local, BF16 models on the CPU: the copy covers every parameter and gives the
    same logits and gradients; a model with other weights fails both comparisons."""
    a = build("hybridnorm_star", te=False, device="cpu")
    randomize_norms(a)
    b = build("hybridnorm_star", te=False, device="cpu")
    other = logits_and_grads(b)
    copy_weights(a, b)
    assert_close(logits_and_grads(b), logits_and_grads(a), 1e-7, "copy")
    assert_no_worse_than_local(logits_and_grads(b), a, "hybridnorm_star", "copy")
    with pytest.raises(AssertionError, match="logits"):
        assert_close(other, logits_and_grads(a), FP8_TOL, "other weights")
    with pytest.raises(AssertionError, match="logits"):
        assert_no_worse_than_local(other, a, "hybridnorm_star", "other weights")


TE_FFN_CASES = [(s, None) for s in SCHEMES] + [(s, c) for s in ("hybridnorm", "postnorm")
                                                for c in ("fused_add", "in_linear")]


@pytest.mark.gpu
@te_gpu
@pytest.mark.parametrize("scheme,te_ffn_norm", TE_FFN_CASES)
def test_te_bf16_matches_local_backend(megatron_single_rank, scheme, te_ffn_norm):
    """Every scheme, and the pre-MLP norm as this package's fused add + norm or inside the FFN's
    first linear, against the local backend."""
    torch.manual_seed(0)
    local = build(scheme, te=False, device="cuda")
    randomize_norms(local)
    te = build(scheme, te=True, device="cuda",
               **({"te_ffn_norm": te_ffn_norm} if te_ffn_norm else {}))
    copy_weights(local, te)
    assert_no_worse_than_local(logits_and_grads(te), local, scheme, f"{scheme} TE BF16")


@pytest.mark.gpu
@te_gpu
@pytest.mark.parametrize("recipe", ["delayed", "tensorwise"])
@pytest.mark.parametrize("scheme", ["prenorm", "hybridnorm", "hybridnorm_star"])
@pytest.mark.usefixtures("megatron_single_rank")
def test_te_fp8_is_close_to_te_bf16(scheme, recipe):
    """After three passes (delayed scaling's amax history filled), FP8 logits and gradients are
    within FP8's error of BF16's, and not equal to them (FP8 ran)."""
    torch.manual_seed(0)
    bf16 = build(scheme, te=True, device="cuda")
    randomize_norms(bf16)
    fp8 = build(scheme, te=True, device="cuda",
                config=model_config(fp8="hybrid", fp8_recipe=recipe))
    copy_weights(bf16, fp8)
    want, got = logits_and_grads(bf16, steps=3), logits_and_grads(fp8, steps=3)
    assert_close(got, want, FP8_TOL, f"{scheme} FP8 {recipe}")
    assert rel_err(got[0], want[0]) > 1e-4, "FP8 logits equal BF16's: FP8 did not run"


@pytest.mark.gpu
@te_gpu
@pytest.mark.usefixtures("megatron_single_rank")
def test_te_moe_with_grouped_gemm_matches_local_sequential_experts():
    """TE's grouped experts (TEGroupedMLP) against the local SequentialMLP with the same expert
    weights; the router's weights are scaled up so that BF16 rounding does not flip the top-2."""
    torch.manual_seed(0)
    local = build("hybridnorm_star", te=False, device="cuda", moe=True)
    randomize_norms(local)
    with torch.no_grad():
        for n, p in local.named_parameters():
            if n.endswith("router.weight"):
                p.mul_(20.0)
    te = build("hybridnorm_star", te=True, device="cuda", moe=True)
    assert any(_EXPERT.search(n) for n in checkpoint_params(te))
    assert any("TEGroupedMLP" in type(m).__name__ for m in te.modules())
    copy_weights(local, te)
    assert_no_worse_than_local(logits_and_grads(te), local, "hybridnorm_star",
                               "MoE grouped GEMM", moe=True)


@pytest.mark.gpu
@te_gpu
@pytest.mark.parametrize("scheme", ["prenorm", "hybridnorm", "hybridnorm_star", "postnorm"])
@pytest.mark.usefixtures("megatron_single_rank")
def test_local_and_te_checkpoints_interchange(tmp_path, scheme):
    """A local checkpoint loads into the TE build, and the TE build's checkpoint back into a
    local model (TE's norms keep no ``_extra_state`` in checkpoints, see norms/te.py)."""
    from megatron.core import dist_checkpointing

    def load(model, path):
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), str(path)))
        return model

    torch.manual_seed(0)
    local = build(scheme, te=False, device="cuda")
    randomize_norms(local)
    for folder in ("local", "te"):
        (tmp_path / folder).mkdir()
    dist_checkpointing.save(local.sharded_state_dict(), str(tmp_path / "local"))
    te = load(build(scheme, te=True, device="cuda"), tmp_path / "local")
    assert_no_worse_than_local(logits_and_grads(te), local, scheme, f"{scheme} local -> TE")
    dist_checkpointing.save(te.sharded_state_dict(), str(tmp_path / "te"))
    back = load(build(scheme, te=False, device="cuda"), tmp_path / "te")
    assert_close(logits_and_grads(back), logits_and_grads(local), 1e-6, f"{scheme} TE -> local")


@te_gpu
@pytest.mark.gpu
def test_the_layout_init_and_the_norm_randomization_see_tes_fused_norms(megatron_single_rank):
    """hybridnorm-check --backend te drew TE's fused norm weights (layer_norm_weight) as
    weights; the CPU twin is tests/test_norm_names.py."""
    from megatron_hybridnorm.harness.layout_init import layout_invariant_init
    from megatron_hybridnorm.norms.names import is_norm_parameter

    model = build("prenorm", te=True, device="cuda")
    fused = {n: p for n, p in model.named_parameters() if n.endswith("layer_norm_weight")}
    assert fused and all(is_norm_parameter(n) for n in fused)
    layout_invariant_init(model, model.config, seed=0)
    assert all(torch.equal(p, torch.ones_like(p)) for p in fused.values())
    randomize_norms(model)
    assert not any(torch.equal(p, torch.ones_like(p)) for p in fused.values())
