"""DeepNorm's two constants and its init (Wang et al. 2022, "DeepNet: Scaling Transformers to
1,000 Layers", arXiv 2203.00555), in its decoder-only form: x' = N(alpha x + G(x)) with
alpha = (2L)^(1/4), and the weights of the FFN, the value projection and the attention output
projection drawn with gain beta = (8L)^(-1/4); L counts blocks (attention + FFN).

DeepNet draws those weights Xavier-normal with gain beta. Here they are what Megatron's init
method drew, times beta, so that the rest of the init (SmallInit, or Megatron's) stays the one
the config chose; the query and key projections are left as drawn, as in DeepNet.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.identity_op import IdentityOp

from megatron_hybridnorm.norms.names import is_norm_parameter


def deepnorm_alpha(num_blocks: int) -> float:
    return (2.0 * num_blocks) ** 0.25


def deepnorm_beta(num_blocks: int) -> float:
    return (8.0 * num_blocks) ** -0.25


def _ffn_weights(mlp):
    """The FFN's (or the experts') projection weights; the router's and any norm's left out."""
    for name, p in mlp.named_parameters():
        if (name.rsplit(".", 1)[-1].startswith("weight") and "router" not in name
                and not is_norm_parameter(name)):
            yield p


def deepnorm_init(layer, num_blocks: int) -> None:
    """Scale ``layer``'s value, output and FFN weights by beta, in place, on this rank's shard."""
    beta = deepnorm_beta(num_blocks)
    with torch.no_grad():
        attn = layer.self_attention
        if not isinstance(attn, IdentityOp):
            w = attn.linear_qkv.weight  # this rank's rows: per KV group [its q heads, k, v]
            groups = attn.num_query_groups_per_partition
            hd = attn.hidden_size_per_attention_head
            per_group = w.shape[0] // groups
            if per_group * groups != w.shape[0] or per_group % hd:
                raise ValueError("DeepNorm's init: linear_qkv's rows are not whole KV groups on "
                                 "this rank; use a TP size that divides num_query_groups")
            w.view(groups, per_group // hd, hd, w.shape[-1])[:, -1].mul_(beta)
            attn.linear_proj.weight.mul_(beta)
        if not isinstance(layer.mlp, IdentityOp):
            for p in _ffn_weights(layer.mlp):
                p.mul_(beta)
