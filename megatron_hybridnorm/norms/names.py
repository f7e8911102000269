"""Which parameters are norm parameters, by name: the one answer every tool here uses (the
layout-invariant init, the check's norm randomization, its replica check and its gradient
groups, the inspector).

A norm's weight or bias (and DyT's alpha) is named, across backends and models:
- ``...input_layernorm.weight``, ``...pre_mlp_layernorm.weight``, ``...post_mlp_layernorm.weight``,
  ``...self_attention.q_layernorm.weight`` (and k, v), ``decoder.final_layernorm.weight``: norm
  modules, local or TE (``TENorm``);
- ``...linear_qkv.layer_norm_weight``, ``...linear_fc1.layer_norm_bias``: the norm fused into
  Transformer Engine's ``LayerNormLinear`` (and the local backend's checkpoint names for it);
- ``decoder.final_norm.weight``: ``HybridModel``'s final norm; ``...mixer.norm.weight``: a Mamba
  mixer's gated norm.
"""

from __future__ import annotations

import re

_NORM_PARAMETER = re.compile(
    r"(?:^|\.)(?:\w*layernorm|final_norm|norm)\.(?:weight|bias|alpha)$"  # a norm module's
    r"|(?:^|\.)layer_norm_(?:weight|bias|alpha)$"  # TE's fused norm in a linear (DyT: ours)
)
# the layer buffers that say LayerNorm Scaling's depth scale and DeepNorm's residual scale
# (they add no norm weight; inspect reads them, the HF export rebuilds them)
DEPTH_SCALE, RESIDUAL_SCALE = "depth_scale", "residual_scale_factor"
_HEAD_NORM = re.compile(r"(?:^|\.)[qkv]_layernorm\.(?:weight|bias|alpha)$")


def is_norm_parameter(name: str) -> bool:
    """Whether the parameter (or checkpoint key) ``name`` belongs to a norm."""
    return _NORM_PARAMETER.search(name) is not None


# where Transformer Engine fuses a pre-norm into the linear after it; Megatron saves the local
# backend's norm under the same names, so that the two backends' checkpoints interchange
FUSED_NORM_PREFIX = {"input": "self_attention.linear_qkv.layer_norm_",
                     "pre_mlp": "mlp.linear_fc1.layer_norm_"}
# a layout's norm slots (``LayerNorms`` fields) and the layer module holding each
NORM_MODULES = {"input": "input_layernorm", "q": "self_attention.q_layernorm",
                "k": "self_attention.k_layernorm", "v": "self_attention.v_layernorm",
                "pre_mlp": "pre_mlp_layernorm", "post_mlp": "post_mlp_layernorm",
                "attn_output": "self_attn_output_layernorm",
                "mlp_output": "mlp_output_layernorm"}


def norm_module_prefix(slot: str) -> str:
    """The layer's module holding the norm of a layout slot ("input", "q", ..., "mlp_output")."""
    return NORM_MODULES[slot] + "."


def norm_checkpoint_prefix(lay, slot: str, moe: bool) -> str:
    """The name under which a layer saves the norm of ``slot`` of layout ``lay``: the one answer
    for the spec's ``sharded_state_dict_keys_map`` and for the scheme detection. A pre-norm
    (its output not the residual) is saved under the fused linear's name, on either backend,
    except a pre-MLP norm before MoE experts, which have no fused linear."""
    fusable = {"input": not lay.input_is_residual,
               "pre_mlp": not lay.pre_mlp_is_residual and not moe}.get(slot, False)
    return FUSED_NORM_PREFIX[slot] if fusable else norm_module_prefix(slot)


def is_head_norm_parameter(name: str) -> bool:
    """Whether ``name`` belongs to a Q, K or V norm inside attention."""
    return _HEAD_NORM.search(name) is not None
