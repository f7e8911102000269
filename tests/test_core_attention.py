"""SDPAttention against a naive float64 softmax attention: causal, GQA, explicit masks."""

import math

import pytest
import torch

from megatron.core.transformer.enums import AttnMaskType
from megatron_hybridnorm.transformer.core_attention import SDPAttention
from helpers import rel_err, tiny_config


def naive(q, k, v, allowed):
    """q [sq,b,np,hn], k/v [sk,b,ng,hn]; allowed [b or 1, 1, sq, sk] (True = may attend)."""
    q, k, v = (t.double().permute(1, 2, 0, 3) for t in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~allowed, float("-inf"))
    out = s.softmax(-1) @ v
    return out.permute(2, 0, 1, 3).flatten(2)


def qkv(sq=7, b=2, np_=4, ng=2, hn=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(sq, b, np_, hn, generator=g), torch.randn(sq, b, ng, hn, generator=g),
            torch.randn(sq, b, ng, hn, generator=g))


@pytest.mark.parametrize("ng", [4, 2, 1])
def test_causal_gqa(ng):
    att = SDPAttention(tiny_config(num_query_groups=ng), 1, AttnMaskType.causal, "self")
    q, k, v = qkv(ng=ng)
    causal = torch.ones(7, 7, dtype=torch.bool).tril()[None, None]
    assert rel_err(att(q, k, v, None), naive(q, k, v, causal)) < 1e-6


def test_explicit_padding_mask_combined_with_causal():
    att = SDPAttention(tiny_config(), 1, AttnMaskType.causal, "self")
    q, k, v = qkv()
    masked = torch.zeros(2, 1, 7, 7, dtype=torch.bool)
    masked[1, ..., 4:] = True  # batch 1: keys 4.. are padding (True = masked, Megatron's way)
    allowed = ~masked & torch.ones(7, 7, dtype=torch.bool).tril()
    out = att(q, k, v, masked)
    assert rel_err(out, naive(q, k, v, allowed)) < 1e-6
    # and it differs from ignoring the mask
    assert rel_err(out, att(q, k, v, None)) > 1e-3


def test_padding_mask_type_is_not_causal():
    att = SDPAttention(tiny_config(), 1, AttnMaskType.padding, "self")
    q, k, v = qkv()
    none_masked = torch.zeros(2, 1, 7, 7, dtype=torch.bool)
    assert rel_err(att(q, k, v, none_masked), naive(q, k, v, ~none_masked)) < 1e-6


def test_softmax_scale_and_gradients():
    att = SDPAttention(tiny_config(), 1, AttnMaskType.causal, "self", softmax_scale=0.3)
    q, k, v = (t.requires_grad_(True) for t in qkv())
    att(q, k, v, None).square().sum().backward()
    ref_in = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    causal = torch.ones(7, 7, dtype=torch.bool).tril()[None, None]
    # scale 0.3 == naive's 1/sqrt(hn) applied to q scaled by 0.3 * sqrt(hn)
    naive(ref_in[0] * 0.3 * 4.0, ref_in[1], ref_in[2], causal).square().sum().backward()
    for a, b in zip((q, k, v), ref_in):
        assert rel_err(a.grad, b.grad) < 1e-6


def test_packed_sequences_are_refused_clearly():
    att = SDPAttention(tiny_config(), 1, AttnMaskType.causal, "self")
    with pytest.raises(NotImplementedError, match="use_transformer_engine=True"):
        att(*qkv(), None, packed_seq_params=object())


def test_causal_queries_shorter_than_keys_are_the_last_positions():
    """3 queries over 7 keys (a chunk after cached ones): query i is position 4 + i, so it sees
    keys 0 .. 4 + i (SDPA's own is_causal would align the queries to the first keys)."""
    att = SDPAttention(tiny_config(), 1, AttnMaskType.causal, "self")
    q, _, _ = qkv(sq=3, seed=1)
    _, k, v = qkv()
    allowed = torch.ones(3, 7, dtype=torch.bool).tril(4)[None, None]
    assert rel_err(att(q, k, v, None), naive(q, k, v, allowed)) < 1e-6
