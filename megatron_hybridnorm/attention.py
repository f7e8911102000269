"""Self-attention with a V norm beside Megatron's Q and K norms."""

from __future__ import annotations

from dataclasses import dataclass, replace

from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.torch_norm import LayerNormBuilder
from megatron.core.typed_torch import apply_module


@dataclass
class QKVNormSelfAttentionSubmodules(SelfAttentionSubmodules):
    v_layernorm: LayerNormBuilder | None = None


class QKVNormSelfAttention(SelfAttention):
    """``SelfAttention`` whose Q, K and V norms come from the spec alone.

    Megatron builds q/k norms only when ``config.qk_layernorm`` is set and refuses them
    otherwise; here the scheme decides, so users never set that flag (setting it is harmless).
    Every norm sees heads ``[sq, b, heads, head_dim]`` after the projection and before RoPE.
    """

    def __init__(self, config, submodules: QKVNormSelfAttentionSubmodules, *args, **kwargs):
        if config.qk_layernorm:
            super().__init__(config, submodules, *args, **kwargs)
        else:
            super().__init__(
                config, replace(submodules, q_layernorm=None, k_layernorm=None), *args, **kwargs
            )
            self.q_layernorm = self._build_head_norm(submodules.q_layernorm)
            self.k_layernorm = self._build_head_norm(submodules.k_layernorm)
        self.v_layernorm = self._build_head_norm(submodules.v_layernorm)

    def _build_head_norm(self, builder):
        if builder is None or builder is IdentityOp:
            return None
        return builder(
            config=self.config,
            hidden_size=self.hidden_size_per_attention_head,
            eps=self.config.layernorm_epsilon,
        )

    def get_query_key_value_tensors(self, *args, **kwargs):
        out = super().get_query_key_value_tensors(*args, **kwargs)
        if self.v_layernorm is None:
            return out
        if not kwargs.get("split_qkv", True):
            raise ValueError("a V norm needs split q/k/v; unset fused_single_qkv_rope")
        # (query, key, value) or (query, key, value, gate)
        out = list(out)
        out[2] = apply_module(self.v_layernorm)(out[2])
        return tuple(out)
