"""The small GPT the checks train, its data, and the helpers that make runs at different parallel
layouts comparable: weights and norm weights drawn by global parameter name, gradients gathered
to their one-rank shape."""

from __future__ import annotations

import zlib

import torch

from megatron_hybridnorm.norms.names import is_norm_parameter
from megatron_hybridnorm.harness.gpt_config import gpt_config
import megatron_hybridnorm as mh
from megatron_hybridnorm.harness.layout_init import full_shape, global_name, shard

VOCAB = 96  # divisible by every TP size up to 32
SEQ = 16


def small_config(**overrides):
    """A small GQA/SwiGLU/RoPE config: 4 layers, d 64, 4 heads over 2 query groups, fp32."""
    return gpt_config(**{**dict(num_layers=4, hidden_size=64, num_attention_heads=4,
                                num_query_groups=2, ffn_hidden_size=96), **overrides})


# what the GPT and the hybrid model share around their decoders
LANGUAGE_MODEL = dict(vocab_size=VOCAB, max_sequence_length=SEQ, position_embedding_type="rope",
                      rotary_base=500000, share_embeddings_and_output_weights=False)


def build_gpt(config, scheme, *, pre_process=True, post_process=True, vp_stage=None,
              use_transformer_engine=False, **options):
    """This pipeline (and virtual pipeline) stage of a GPTModel of ``scheme``."""
    from megatron.core.models.gpt import GPTModel


    spec = mh.get_decoder_block_spec(config, scheme, vp_stage=vp_stage,
                                     use_transformer_engine=use_transformer_engine, **options)
    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
        pre_process=pre_process,
        post_process=post_process,
        vp_stage=vp_stage,
        **LANGUAGE_MODEL,
    )


def build_hybrid(config, scheme, pattern, *, pre_process=True, post_process=True, vp_stage=None,
                 use_transformer_engine=False, **options):
    """This pipeline (and virtual pipeline) stage of a HybridModel of ``scheme`` on ``pattern``
    (``|`` splits it into pipeline stages)."""
    # here, not at the top: HybridModel is megatron-core >= 0.18's, and GPT checks run on 0.16
    from megatron.core.models.hybrid.hybrid_model import HybridModel

    from megatron_hybridnorm.models.hybrid import get_hybrid_stack_spec

    spec = get_hybrid_stack_spec(config, scheme, pattern,
                                 use_transformer_engine=use_transformer_engine, **options)
    return HybridModel(
        config=config,
        hybrid_stack_spec=spec,
        hybrid_layer_pattern=pattern,
        pre_process=pre_process,
        post_process=post_process,
        vp_stage=vp_stage,
        **LANGUAGE_MODEL,
    )


def randomize_norms(model, seed=7):
    """Norm weights that are not 1 (and LayerNorm biases that are not 0), drawn per global
    parameter name: the same values at any TP/PP layout."""
    tp, rank = _tp()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not is_norm_parameter(name):
                continue
            key = global_name(model, name, p)
            g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
            # draw at full (TP=1) width, then keep this rank's slice for sharded norms
            r = torch.randn(full_shape(p, tp), generator=g, dtype=torch.float32, device="cpu")
            r = (1.0 + 0.3 * r if name.endswith("weight") else 0.5 + 0.1 * r
                 if name.endswith("alpha") else 0.1 * r)  # DyT's alpha near its init
            p.copy_(shard(p, r, tp, rank))


def _tp():
    from megatron.core import parallel_state

    return (parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_tensor_model_parallel_rank())


def batch(seed=0, b=2, device="cpu"):
    """(tokens, labels, position ids), drawn on the CPU (the same on any device), on ``device``."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (b, SEQ), generator=g, device="cpu")
    labels = torch.randint(0, VOCAB, (b, SEQ), generator=g, device="cpu")
    position_ids = torch.arange(SEQ, device="cpu").unsqueeze(0).expand(b, SEQ)
    return tokens.to(device), labels.to(device), position_ids.to(device)


def rel_err(a, b):
    """Relative error of ``a`` against ``b`` (in float64 on the CPU, wherever they live)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
