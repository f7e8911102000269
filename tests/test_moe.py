"""Mixture-of-Experts layers with every scheme; EP=2 and TP=2 against one rank on gloo."""

import pytest
import torch

import megatron_hybridnorm as mh
from launcher import Parallel, run_distributed
from helpers import batch, build_gpt, randomize_norms, tiny_config
from test_tensor_parallel import assert_same_training

import dist_cases

# the paper's MoE settings, small: top-k routing, load-balancing and z losses, dense and MoE
# layers mixed, a shared expert
MOE = dict(num_moe_experts=4, moe_router_topk=2, moe_token_dispatcher_type="alltoall",
           moe_aux_loss_coeff=1e-2, moe_z_loss_coeff=1e-3, moe_layer_freq=[0, 1, 1, 1],
           moe_shared_expert_intermediate_size=32)


@pytest.mark.parametrize("scheme", mh.SCHEMES)
def test_every_scheme_trains_with_moe_layers(megatron_single_rank, scheme):
    torch.manual_seed(0)
    model = build_gpt(tiny_config(**MOE), scheme)
    tokens, labels, pos = batch()
    loss = model(tokens, pos, None, labels=labels).mean()
    loss.backward()
    assert torch.isfinite(loss)
    moe = model.decoder.layers[1].mlp
    assert type(moe).__name__ == "MoELayer" and type(moe.experts).__name__ == "SequentialMLP"
    assert all(p.grad is not None for n, p in model.named_parameters() if "router" in n)


@pytest.mark.parametrize("scheme", ["hybridnorm", "hybridnorm_star", "postnorm"])
def test_router_and_experts_see_the_post_normed_tensor_which_is_the_residual(
        megatron_single_rank, scheme):
    torch.manual_seed(0)
    model = build_gpt(tiny_config(**MOE), scheme)
    randomize_norms(model)
    layer = model.decoder.layers[2]
    seen = {}
    layer.pre_mlp_layernorm.register_forward_hook(lambda m, i, o: seen.update(norm=o[0]))
    layer.mlp.router.register_forward_hook(lambda m, i, o: seen.update(router=i[0]))
    layer.mlp.register_forward_hook(lambda m, i, o: seen.update(moe_in=i[0], moe_out=o[0]))
    layer.register_forward_hook(lambda m, i, o: seen.update(out=o[0]))
    tokens, labels, pos = batch()
    model(tokens, pos, None, labels=labels)
    assert torch.equal(seen["router"], seen["norm"].reshape(seen["router"].shape))
    assert torch.equal(seen["moe_in"], seen["norm"])
    # the residual is the normed tensor: out = n + MoE(n), and Post-Norm norms that again
    expected = seen["norm"] + seen["moe_out"]
    if scheme == "postnorm":
        expected = layer.post_mlp_layernorm(expected)
    assert torch.allclose(seen["out"], expected, atol=1e-6)


# EP=2 on 2 ranks is also DP=2: both ranks get the whole batch, since the load-balancing loss
# depends on which tokens share a rank
CASES = [dict(scheme=s, config=MOE, replicate_batch=True) for s in ("hybridnorm", "hybridnorm_star")]


@pytest.fixture(scope="module")
def runs():
    one = run_distributed(dist_cases.train_cases, 1, Parallel(), args=(CASES,), timeout=600)[0]
    ep2 = run_distributed(dist_cases.train_cases, 2, Parallel(ep=2), args=(CASES,), timeout=600)
    tp_cases = [dict(c, sp=True) for c in CASES]  # Megatron wants SP with MoE under TP
    tp2 = run_distributed(dist_cases.train_cases, 2, Parallel(tp=2), args=(tp_cases,),
                          timeout=600)
    return one, ep2, tp2


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["ep2", "tp2"])
@pytest.mark.parametrize("i", range(len(CASES)), ids=[c["scheme"] for c in CASES])
def test_moe_parallel_matches_one_rank(runs, layout, i):
    one, ep2, tp2 = runs
    ranks = [r[i] for r in (ep2 if layout == "ep2" else tp2)]
    assert_same_training(one[i], ranks)
    experts = [n for n in one[i]["grads"] if ".local_experts.3." in n]
    assert experts  # expert 3 lives on EP rank 1: its gradient was compared too
