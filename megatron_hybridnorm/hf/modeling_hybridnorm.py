"""HybridNorm and its baselines as a Hugging Face ``transformers`` causal LM.

This file is copied into every exported model folder and needs only torch and transformers. The
per-layer norm layout comes from ``config.layer_norms`` (written by megatron-hybridnorm's export
from its scheme table); parameters keep Megatron-Core's names and layouts (the fused, per-KV-group
``linear_qkv``; SwiGLU's ``linear_fc1`` as [gate; up]), so a Megatron checkpoint maps onto it
one to one.

Each layer, with N a norm computed in fp32 (RMSNorm or LayerNorm; weight + 1 when the gamma is
zero-centered):
    attention input  a = N_in(x) if the layout has an input norm, else x
    attention residual r = a if the input norm's output is the residual, else x
    y = r + Attn(a), with per-head (or full-width) norms on q, k, v after the projection and
    before RoPE
    FFN input        m = N_pre(y) if the layout has a pre-MLP norm, else y
    FFN residual     s = m if that norm's output is the residual, else y
    out = s + FFN(m), then N_post(out) if the layout has a post-MLP norm
and a final norm before the LM head. Where the layout says so: each sublayer's output is normed
before its add (``attn_output``, ``mlp_output``: Peri-LN, OLMo 2), a and m are scaled by
1/sqrt(l), l the 1-based layer (``depth_scaled``: LayerNorm Scaling), and both residuals are
scaled by (2 L)^(1/4) before their add (``deepnorm``).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

LAYOUT_KEYS = ("input", "input_is_residual", "q", "k", "v", "pre_mlp", "pre_mlp_is_residual",
               "post_mlp", "attn_output", "mlp_output", "depth_scaled", "deepnorm")


class HybridNormConfig(PretrainedConfig):
    model_type = "hybridnorm"

    def __init__(self, vocab_size=256, hidden_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=None, head_dim=None,
                 intermediate_size=None, gated_linear_unit=True, hidden_act="silu",
                 normalization="RMSNorm", norm_eps=1e-5, zero_centered_gamma=False,
                 qkv_norm="head", layer_norms=None, scheme=None, rope_theta=10000.0,
                 rotary_percent=1.0, rotary_interleaved=False, max_position_embeddings=2048,
                 add_bias_linear=False, tie_word_embeddings=True, use_cache=True, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.intermediate_size = intermediate_size or 4 * hidden_size
        self.gated_linear_unit = gated_linear_unit
        self.hidden_act = hidden_act
        self.normalization = normalization
        self.norm_eps = norm_eps
        self.zero_centered_gamma = zero_centered_gamma
        self.qkv_norm = qkv_norm
        self.layer_norms = layer_norms or [dict(input=True, pre_mlp=True)] * num_hidden_layers
        self.scheme = scheme
        self.rope_theta = rope_theta
        self.rotary_percent = rotary_percent
        self.rotary_interleaved = rotary_interleaved
        self.max_position_embeddings = max_position_embeddings
        self.add_bias_linear = add_bias_linear
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


class Norm(nn.Module):
    """RMSNorm or LayerNorm over the last dim, or DyT (gamma * tanh(alpha * x) + beta), in fp32,
    cast back."""

    def __init__(self, width: int, config: HybridNormConfig):
        super().__init__()
        self.kind, self.eps = config.normalization, config.norm_eps
        self.offset = 1.0 if config.zero_centered_gamma else 0.0
        self.weight = nn.Parameter(torch.full((width,), 1.0 - self.offset))
        self.bias = nn.Parameter(torch.zeros(width)) if self.kind != "RMSNorm" else None
        self.alpha = nn.Parameter(torch.full((1,), 0.5)) if self.kind == "DyT" else None

    def forward(self, x):
        xf, w = x.float(), self.weight.float() + self.offset
        if self.kind == "DyT":
            y = torch.tanh(self.alpha.float() * xf) * w + self.bias.float()
        elif self.kind == "RMSNorm":
            y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * w
        else:
            y = F.layer_norm(xf, (xf.shape[-1],), w, self.bias.float(), self.eps)
        return y.to(x.dtype)


def _rotate(x, interleaved: bool):
    if interleaved:
        x1, x2 = x[..., ::2], x[..., 1::2]
        return torch.stack((-x2, x1), dim=-1).flatten(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Rotary(nn.Module):
    """Megatron-Core's RoPE: the first ``rotary_percent`` of each head rotates. The frequencies
    are computed where they are used (a buffer would be lost when transformers builds the model
    on the meta device and loads only the saved weights)."""

    def __init__(self, config: HybridNormConfig):
        super().__init__()
        self.dim = int(config.head_dim * config.rotary_percent)
        self.interleaved = config.rotary_interleaved
        self.theta = config.rope_theta

    def forward(self, x, positions):
        """x: [b, heads, s, d]; positions: [b, s] (absolute)."""
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.dim, 2, dtype=torch.float32,
                                                      device=x.device) / self.dim))
        freqs = positions[..., None].float() * inv_freq
        emb = (torch.stack((freqs, freqs), -1).flatten(-2) if self.interleaved
               else torch.cat((freqs, freqs), -1))[:, None]  # [b, 1, s, dim]
        rot, rest = x[..., :self.dim], x[..., self.dim:]
        rot = (rot.float() * emb.cos() + _rotate(rot.float(), self.interleaved) * emb.sin())
        return torch.cat((rot.to(x.dtype), rest), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: HybridNormConfig, layout: dict, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.heads, self.groups = config.num_attention_heads, config.num_key_value_heads
        self.head_dim, self.full = config.head_dim, config.qkv_norm == "full"
        per_group = (self.heads // self.groups + 2) * self.head_dim
        self.linear_qkv = nn.Linear(config.hidden_size, self.groups * per_group,
                                    bias=config.add_bias_linear)
        self.linear_proj = nn.Linear(self.heads * self.head_dim, config.hidden_size,
                                     bias=config.add_bias_linear)
        for kind, heads in (("q", self.heads), ("k", self.groups), ("v", self.groups)):
            width = heads * self.head_dim if self.full else self.head_dim
            setattr(self, f"{kind}_layernorm", Norm(width, config) if layout.get(kind) else None)
        self.rotary = Rotary(config)

    def _norm(self, norm, t):
        """t: [b, s, heads, d]; per head, or over all heads (full width)."""
        if norm is None:
            return t
        if self.full:
            return norm(t.flatten(-2)).view_as(t)
        return norm(t)

    def forward(self, x, positions, mask, cache):
        b, s, _ = x.shape
        P = self.heads // self.groups
        mixed = self.linear_qkv(x).view(b, s, self.groups, P + 2, self.head_dim)
        q = self._norm(self.q_layernorm, mixed[..., :P, :].reshape(b, s, self.heads, self.head_dim))
        k = self._norm(self.k_layernorm, mixed[..., P, :])
        v = self._norm(self.v_layernorm, mixed[..., P + 1, :])
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [b, heads, s, d]
        q, k = self.rotary(q, positions), self.rotary(k, positions)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        k = k.repeat_interleave(P, dim=1)
        v = v.repeat_interleave(P, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             scale=1.0 / math.sqrt(self.head_dim))
        return self.linear_proj(out.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, config: HybridNormConfig):
        super().__init__()
        width = config.intermediate_size * (2 if config.gated_linear_unit else 1)
        self.linear_fc1 = nn.Linear(config.hidden_size, width, bias=config.add_bias_linear)
        self.linear_fc2 = nn.Linear(config.intermediate_size, config.hidden_size,
                                    bias=config.add_bias_linear)
        self.gated = config.gated_linear_unit
        self.act = {"silu": F.silu, "gelu": F.gelu}[config.hidden_act]

    def forward(self, x):
        h = self.linear_fc1(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            return self.linear_fc2(self.act(gate) * up)
        return self.linear_fc2(self.act(h))


def depth_scale(layer_idx: int) -> float:
    """LayerNorm Scaling's factor on a norm's output in layer ``layer_idx`` (0-based)."""
    return 1 / math.sqrt(layer_idx + 1)


def residual_scale(num_layers: int) -> float:
    """DeepNorm's factor on both residuals."""
    return (2 * num_layers) ** 0.25


class Layer(nn.Module):
    def __init__(self, config: HybridNormConfig, layout: dict, layer_idx: int):
        super().__init__()
        unknown = set(layout) - set(LAYOUT_KEYS)
        if unknown:
            raise ValueError(f"layer {layer_idx}: unknown norm slots {sorted(unknown)}")
        self.layout = layout
        h = config.hidden_size
        norm = lambda key: Norm(h, config) if layout.get(key) else None  # noqa: E731
        self.input_layernorm = norm("input")
        self.self_attention = Attention(config, layout, layer_idx)
        self.self_attn_output_layernorm = norm("attn_output")
        self.pre_mlp_layernorm = norm("pre_mlp")
        self.mlp = MLP(config)
        self.mlp_output_layernorm = norm("mlp_output")
        self.post_mlp_layernorm = norm("post_mlp")
        self.feed_scale = depth_scale(layer_idx) if layout.get("depth_scaled") else 1.0
        self.alpha = residual_scale(config.num_hidden_layers) if layout.get("deepnorm") else 1.0

    @staticmethod
    def _maybe(norm, t):
        return t if norm is None else norm(t)

    def forward(self, x, positions, mask, cache):
        a = self._maybe(self.input_layernorm, x)
        residual = a if self.layout.get("input_is_residual") else x
        attn = self.self_attention(a * self.feed_scale if self.input_layernorm is not None else a,
                                   positions, mask, cache)
        y = self.alpha * residual + self._maybe(self.self_attn_output_layernorm, attn)
        m = self._maybe(self.pre_mlp_layernorm, y)
        residual = m if self.layout.get("pre_mlp_is_residual") else y
        ffn = self.mlp(m * self.feed_scale if self.pre_mlp_layernorm is not None else m)
        out = self.alpha * residual + self._maybe(self.mlp_output_layernorm, ffn)
        return self._maybe(self.post_mlp_layernorm, out)


class Embedding(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)


class Decoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList(Layer(config, layout, i)
                                    for i, layout in enumerate(config.layer_norms))
        self.final_layernorm = Norm(config.hidden_size, config)


# the output dataclass names its cache field "cache" in recent transformers, "past_key_values"
# before
_CACHE_FIELD = ("cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
                else "past_key_values")


class HybridNormForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = HybridNormConfig
    base_model_prefix = "decoder"
    _supports_sdpa = True
    _tied_weights_keys = {"output_layer.weight": "embedding.word_embeddings.weight"}

    def __init__(self, config: HybridNormConfig):
        super().__init__(config)
        self.embedding = Embedding(config)
        self.decoder = Decoder(config)
        self.output_layer = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.embedding.word_embeddings

    def set_input_embeddings(self, value):
        self.embedding.word_embeddings = value

    def get_output_embeddings(self):
        return self.output_layer

    def set_output_embeddings(self, value):
        self.output_layer = value

    def _mask(self, attention_mask, q_len, past, device):
        """Causal over [past + q_len] keys, queries the last q_len; padding from the 2D mask.
        None (SDPA's default: attend everywhere) for a single decoded token without padding."""
        total = past + q_len
        allowed = torch.ones(q_len, total, dtype=torch.bool, device=device).tril(past)[None, None]
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, None, -total:].bool()
        elif q_len == 1:
            return None
        return allowed

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                past_key_values=None, inputs_embeds=None, labels=None, use_cache=None,
                logits_to_keep=0, **kwargs):
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache()
        x = self.embedding.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        b, s = x.shape[:2]
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = (torch.arange(s, device=x.device) + past).unsqueeze(0).expand(b, s)
        mask = self._mask(attention_mask, s, past, x.device)
        for layer in self.decoder.layers:
            x = layer(x, position_ids, mask, cache if use_cache else None)
        x = self.decoder.final_layernorm(x)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.output_layer(x).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1))
        return CausalLMOutputWithPast(loss=loss, logits=logits,
                                      **{_CACHE_FIELD: cache if use_cache else None})
