"""Core attention on ``torch.nn.functional.scaled_dot_product_attention``.

Megatron's local ``DotProductAttention`` allocates its score buffer on CUDA and materializes the
whole score matrix. SDPA picks flash or cuDNN kernels on a GPU and the math kernel on a CPU.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

_CAUSAL = (AttnMaskType.causal, AttnMaskType.padding_causal)


class SDPAttention(MegatronModule):
    """Drop-in for Megatron's ``DotProductAttention`` (same constructor, same forward).

    Takes q ``[sq, b, np, hn]`` and k, v ``[sk, b, ng, hn]`` (GQA when ng < np) and returns
    ``[sq, b, np * hn]``. Megatron's masks are True where attention is NOT allowed. With a causal
    mask type, causality is applied; an explicit mask is combined with it.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        check_sdpa_config(config)
        self.attn_mask_type = attn_mask_type
        head_dim = config.kv_channels
        # apply_query_key_layer_scaling divides and re-multiplies by the layer number around the
        # softmax for fp16 range; the function is unchanged and SDPA accumulates in fp32.
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None:
            raise NotImplementedError(
                "packed sequences (THD) need Transformer Engine attention: build the spec with "
                "use_transformer_engine=True"
            )
        if attention_bias is not None:
            raise NotImplementedError("attention_bias is not supported by SDPAttention")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        causal = mask_type in _CAUSAL
        sq, b, np_, hn = query.shape
        sk = key.shape[0]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hn]

        mask = None
        if attention_mask is not None or (causal and sq != sk):
            # SDPA's is_causal aligns a shorter query block to the top-left; Megatron's queries
            # are the last sq of the sk positions (bottom-right)
            mask = (torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
                    if causal else None)
            if attention_mask is not None:
                allowed = ~attention_mask.to(torch.bool)
                mask = allowed if mask is None else allowed & mask
            causal = False

        dropout = self.dropout if self.training else 0.0
        if dropout > 0.0 and not self.config.sequence_parallel:
            rng = tensor_parallel.get_cuda_rng_tracker().fork()
        else:
            rng = nullcontext()
        with rng:
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                dropout_p=dropout,
                is_causal=causal,
                scale=self.softmax_scale,
                enable_gqa=k.shape[1] != np_,
            )
        return out.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)


def check_sdpa_config(config: TransformerConfig) -> None:
    """Raise for attention options that SDPAttention would otherwise ignore."""
    if config.context_parallel_size > 1:
        raise ValueError(
            "context parallelism needs Transformer Engine attention; build the spec with "
            "use_transformer_engine=True, or set context_parallel_size=1"
        )
    if config.window_size is not None:
        raise ValueError(
            "sliding-window attention (window_size) needs Transformer Engine attention; build "
            "the spec with use_transformer_engine=True"
        )
    if getattr(config, "softmax_type", "vanilla") != "vanilla":
        raise ValueError(
            f"softmax_type={config.softmax_type!r} needs Transformer Engine attention; build the "
            "spec with use_transformer_engine=True"
        )
