"""Self-attention with a V norm beside Megatron's Q and K norms, and the fused Q/K/V norm.

One hand-over, ``_pending_rope``: where the fused per-head kernel can also rotate q and k,
``forward`` keeps the rotary embedding, calls Megatron's forward without it (so Megatron applies
none), and ``get_query_key_value_tensors``, which Megatron's forward calls once, takes it for the
kernel. Megatron's forward passes no argument from one to the other, so the attention holds it
for that one call; it is cleared in a ``finally``, and a kept embedding that the kernel did not
use raises rather than leaving q and k unrotated. The same code serves megatron-core 0.16 to
0.20 (none of them splits this forward into hooks).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.typed_torch import apply_module

from megatron_hybridnorm.compat import LayerNormBuilder, yarn_mscale
from megatron_hybridnorm.kernels import (
    MAX_HEAD_DIM,
    full_row_fits,
    fused_qkv_full_norm,
    fused_qkv_norm,
    rope_tables,
)
from megatron_hybridnorm.kernels.dispatch import kernel_path, kernel_setting
from megatron_hybridnorm.kernels.report import record
from megatron_hybridnorm.norms import FullWidthNorm, HeadNorm


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
        self._pending_rope = None
        self.kernels = kernel_setting()  # HYBRIDNORM_KERNELS, read once as the model is built

    def _build_head_norm(self, builder):
        if builder is None or builder is IdentityOp:
            return None
        norm = builder(
            config=self.config,
            hidden_size=self.hidden_size_per_attention_head,
            eps=self.config.layernorm_epsilon,
        )
        norm.tp_group = self.pg_collection.tp  # this model's TP group, not the global one
        return norm

    def _fused_qkv_norms(self, hidden_states, output_gate: bool, split_qkv: bool
                         ) -> tuple[str | None, str]:
        """Which Triton pass normalizes q, k and v in one go: "head" (kernels/qkv_norm.py),
        "full" (kernels/qkv_full_norm.py) or None (the norm modules, one by one), and why.
        Needs RMS norms of one kind, no output gate, and each rank holding whole KV groups."""
        q, k, v = self.q_layernorm, self.k_layernorm, self.v_layernorm
        triton, why = kernel_path(hidden_states, self.kernels)
        for blocker, reason in ((not triton, why), (not split_qkv, "q, k and v not split"),
                                (output_gate, "attention output gate"),
                                (self.config.test_mode, "test_mode"),
                                (self.config.num_query_groups < self.world_size,
                                 "a KV head split over TP ranks")):
            if blocker:
                return None, reason
        for kind in (HeadNorm, FullWidthNorm):
            if all(isinstance(n, kind) and n.kind == "RMSNorm" for n in (q, k)) and (
                v is None or (isinstance(v, kind) and v.kind == "RMSNorm")
            ):
                break
        else:
            return None, "not RMS norms of one kind on q and k (and v)"
        groups = self.num_query_groups_per_partition
        P, hd = self.num_attention_heads_per_partition // groups, self.hidden_size_per_attention_head
        if kind is HeadNorm:
            if hd > MAX_HEAD_DIM:
                return None, f"head_dim {hd} > {MAX_HEAD_DIM}"
            return "head", why
        if not full_row_fits(groups, P, hd):
            return None, "q row wider than the full-width kernel takes"
        return "full", why

    def _fusable_rope(self, hidden_states, args, kwargs):
        """Megatron's rotary ``freqs`` when the per-head kernel can apply RoPE itself: plain
        self-attention (sbhd, no packed sequences, no CP, no inference context) with the same
        angles for q and k. Otherwise None, and Megatron applies RoPE as usual."""
        rope = kwargs.get("rotary_pos_emb")
        if isinstance(rope, tuple):
            rope = rope[0] if len(rope) == 2 and rope[0] is rope[1] else None
        no_rope = self.config.no_rope_freq and self.config.no_rope_freq[self.layer_number - 1]
        if (
            rope is None
            or args
            or no_rope
            or any(kwargs.get(k) is not None for k in (
                "key_value_states", "inference_context", "inference_params", "packed_seq_params",
                "rotary_pos_cos", "rotary_pos_sin", "rotary_pos_cos_sin"))
            or self.config.flash_decode
            or self.config.multi_latent_attention
            or self.pg_collection.cp.size() > 1
            or rope.dim() != 4
            or rope.shape[-1] > self.hidden_size_per_attention_head
            or rope.shape[-1] % 2
        ):
            return None
        fused, _ = self._fused_qkv_norms(hidden_states, self.config.attention_output_gate, True)
        return rope if fused == "head" else None

    def forward(self, hidden_states, attention_mask, *args, **kwargs):
        """Megatron's forward; where ``_fusable_rope`` allows, RoPE moves into the Q/K/V norm
        kernel (``get_query_key_value_tensors``) and Megatron gets no rotary embedding to apply."""
        rope = self._fusable_rope(hidden_states, args, kwargs)
        if rope is None:
            return super().forward(hidden_states, attention_mask, *args, **kwargs)
        self._pending_rope = rope
        try:
            return super().forward(
                hidden_states, attention_mask, *args, **{**kwargs, "rotary_pos_emb": None}
            )
        finally:
            self._pending_rope = None

    def get_query_key_value_tensors(
        self, hidden_states, key_value_states=None, output_gate=False, split_qkv=True
    ):
        fused, why = self._fused_qkv_norms(hidden_states, output_gate, split_qkv)
        rope, self._pending_rope = self._pending_rope, None
        if rope is not None and fused != "head":
            raise RuntimeError(
                "QKVNormSelfAttention: RoPE was left to the fused Q/K/V norm, which did not run; "
                "set HYBRIDNORM_KERNELS=torch and report this"
            )
        if any(n is not None for n in (self.q_layernorm, self.k_layernorm, self.v_layernorm)):
            record(self, f"triton {'qkv_norm' if fused == 'head' else 'qkv_full_norm'}"
                   f"{' + RoPE' if rope is not None else ''} ({why})" if fused else
                   f"the Q/K/V norm modules one by one ({why})")
        if fused is not None:
            mixed, _ = apply_module(self.linear_qkv)(hidden_states)
            groups = self.num_query_groups_per_partition
            q, k, v = self.q_layernorm, self.k_layernorm, self.v_layernorm
            common = dict(
                heads_per_group=self.num_attention_heads_per_partition // groups,
                head_dim=self.hidden_size_per_attention_head,
                eps=q.eps,
                zero_centered=q.zero_centered_gamma,
            )
            mixed = mixed.view(*mixed.shape[:-1], groups, -1)
            if fused == "full":
                group = self.pg_collection.tp if self.world_size > 1 else None
                return fused_qkv_full_norm(
                    mixed, q.weight, k.weight, None if v is None else v.weight,
                    widths=(q.global_width, k.global_width), group=group, **common,
                )
            if rope is not None:
                hd = self.hidden_size_per_attention_head
                common["rope"] = rope_tables(rope, mixed.shape[0], hd, yarn_mscale(self))
                common["rope_interleaved"] = self.config.rotary_interleaved
            return fused_qkv_norm(
                mixed,
                q.scaled(q.weight),
                k.scaled(k.weight),
                None if v is None else v.scaled(v.weight),
                **common,
            )
        out = super().get_query_key_value_tensors(
            hidden_states, key_value_states, output_gate=output_gate, split_qkv=split_qkv
        )
        if self.v_layernorm is None:
            return out
        if not split_qkv:
            raise ValueError("a V norm needs split q/k/v; unset fused_single_qkv_rope")
        # (query, key, value) or (query, key, value, gate)
        out = list(out)
        out[2] = apply_module(self.v_layernorm)(out[2])
        return tuple(out)
