"""The small GPT the checks train, its data, and the helpers that make runs at different parallel
layouts comparable: weights and norm weights drawn by global parameter name, gradients gathered
to their one-rank shape."""

from __future__ import annotations

import zlib

import torch
import torch.nn.functional as F

from ..norms.names import is_norm_parameter

VOCAB = 96  # divisible by every TP size up to 32
SEQ = 16


def small_config(**overrides):
    """A small GQA/SwiGLU/RoPE config: 4 layers, d 64, 4 heads over 2 query groups, fp32."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    kw = dict(
        num_layers=4,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=96,
        gated_linear_unit=True,
        activation_func=F.silu,
        normalization="RMSNorm",
        layernorm_epsilon=1e-5,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
    )
    kw.update(overrides)
    return TransformerConfig(**kw)


# what the GPT and the hybrid model share around their decoders
LANGUAGE_MODEL = dict(vocab_size=VOCAB, max_sequence_length=SEQ, position_embedding_type="rope",
                      rotary_base=500000, share_embeddings_and_output_weights=False)


def build_gpt(config, scheme, *, pre_process=True, post_process=True, vp_stage=None,
              use_transformer_engine=False, **options):
    """This pipeline (and virtual pipeline) stage of a GPTModel of ``scheme``."""
    from megatron.core.models.gpt import GPTModel

    import megatron_hybridnorm as mh

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
    from megatron.core.models.hybrid.hybrid_model import HybridModel

    from ..hybrid import get_hybrid_stack_spec

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
    from ..layout_init import global_name

    with torch.no_grad():
        for name, p in model.named_parameters():
            if not is_norm_parameter(name):
                continue
            key = global_name(model, name, p)
            g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
            # draw at full (TP=1) width, then keep this rank's slice for sharded norms
            r = torch.randn(_full_shape(p), generator=g, dtype=torch.float32, device="cpu")
            r = 1.0 + 0.3 * r if name.endswith("weight") else 0.1 * r
            p.copy_(_local_slice(p, r))


def _tp():
    from megatron.core import parallel_state

    return (parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_tensor_model_parallel_rank())


def _full_shape(p):
    if not getattr(p, "tensor_model_parallel", False):
        return p.shape
    size, _ = _tp()
    shape = list(p.shape)
    shape[p.partition_dim] *= size
    return shape


def _local_slice(p, full):
    if not getattr(p, "tensor_model_parallel", False):
        return full
    size, rank = _tp()
    stride = getattr(p, "partition_stride", 1)
    chunks = full.chunk(size * stride, dim=p.partition_dim)
    return torch.cat(chunks[rank::size], dim=p.partition_dim)


def gather_full(p, t):
    """The TP=1 tensor (on the CPU) for a parameter's (possibly TP-sharded) local tensor ``t``."""
    if not getattr(p, "tensor_model_parallel", False):
        return t.detach().cpu().clone()
    from megatron.core import parallel_state

    size, _ = _tp()
    parts = [torch.empty_like(t) for _ in range(size)]
    torch.distributed.all_gather(parts, t.contiguous(),
                                 group=parallel_state.get_tensor_model_parallel_group())
    stride = getattr(p, "partition_stride", 1)
    pieces = [part.cpu().chunk(stride, dim=p.partition_dim) for part in parts]
    return torch.cat([pieces[r][j] for j in range(stride) for r in range(size)],
                     dim=p.partition_dim)


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
