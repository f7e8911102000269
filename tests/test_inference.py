"""Megatron-Core inference with a KV cache (its static inference context): greedy decoding
gives the same logits as a full forward over the whole sequence, for every scheme, with the
norms on torch and with the Triton kernels forced (the fused Q/K/V path)."""

import pytest
import torch

import megatron_hybridnorm as mh
from helpers import VOCAB, randomize_norms, rel_err, tiny_config

PROMPT, NEW = 8, 16


def decode(model, prompt, new=NEW):
    """Greedy decoding of ``new`` tokens with Megatron-Core's KV cache (its static inference
    context); the tokens and the logits of every decoded position."""
    from megatron.core.inference.contexts import StaticInferenceContext

    b, n = prompt.shape
    ctx = StaticInferenceContext(max_batch_size=b, max_sequence_length=n + new)
    pos = torch.arange(n + new).unsqueeze(0).expand(b, -1)
    tokens, steps = prompt, []
    logits = model(prompt, pos[:, :n], None, inference_context=ctx)[:, -1]
    ctx.sequence_len_offset += n
    for t in range(new):
        steps.append(logits)
        nxt = logits.argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, nxt], dim=1)
        if t + 1 < new:
            logits = model(nxt, pos[:, n + t:n + t + 1], None, inference_context=ctx)[:, -1]
            ctx.sequence_len_offset += 1
    return tokens, torch.stack(steps, dim=1)


def build(scheme):
    from megatron.core.models.gpt import GPTModel

    cfg = tiny_config()
    spec = mh.get_decoder_block_spec(cfg, scheme)
    model = GPTModel(config=cfg, transformer_layer_spec=spec, vocab_size=VOCAB,
                     max_sequence_length=PROMPT + NEW, position_embedding_type="rope",
                     rotary_base=500000)
    randomize_norms(model)
    return model.eval()


def check_decoding(scheme):
    torch.manual_seed(0)
    model = build(scheme)
    prompt = torch.randint(0, VOCAB, (2, PROMPT), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tokens, cached = decode(model, prompt)
        pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand(2, -1)
        full = model(tokens, pos, None)[:, PROMPT - 1:-1]  # what predicted each new token
    assert rel_err(cached, full) < 1e-5
    assert len(set(tokens[0, PROMPT:].tolist())) > 1  # it decoded, not one token repeated


@pytest.mark.parametrize("scheme", mh.SCHEMES)
def test_kv_cache_decoding_matches_a_full_forward(megatron_single_rank, scheme):
    check_decoding(scheme)


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["hybridnorm", "hybridnorm_star", "prenorm_qknorm"])
def test_kv_cache_decoding_with_the_kernels_forced(megatron_single_rank, monkeypatch, scheme):
    """Under Triton's interpreter: the fused Q/K/V norm in prefill and decode steps with
    Megatron's RoPE (inference keeps RoPE out of the fused kernel), and in the full forward with
    RoPE fused."""
    import importlib

    monkeypatch.setenv("HYBRIDNORM_KERNELS", "triton")
    qkv = importlib.import_module("megatron_hybridnorm.kernels.qkv_norm")
    calls = []  # (sequence length, RoPE fused)
    original = qkv.qkv_norm
    monkeypatch.setattr(qkv, "qkv_norm", lambda mixed, *a, **k: calls.append(
        (mixed.shape[0], k.get("rope") is not None)) or original(mixed, *a, **k))
    check_decoding(scheme)
    layers = tiny_config().num_layers
    assert calls.count((PROMPT, False)) == layers  # prefill
    assert calls.count((1, False)) == layers * (NEW - 1)  # decode steps
    assert calls.count((PROMPT + NEW, True)) == layers  # the full forward
