"""An independent plain-PyTorch GPT for every scheme, written from the block equations of
the paper's official code (the README's scheme table; not from the package's scheme tables), computed in float64.

It takes its weights from a Megatron ``GPTModel`` state dict (TP=1) by Megatron's parameter
names, so a norm in the wrong slot or the wrong place in the equations shows up as a mismatch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class RefConfig:
    def __init__(self, *, hidden, heads, groups, layers, ffn, eps, rope_base, normalization,
                 qkv_norm="head", mixln_fraction=0.25, zero_centered=False):
        self.hidden, self.heads, self.groups, self.layers, self.ffn = hidden, heads, groups, layers, ffn
        self.head_dim = hidden // heads
        self.eps, self.rope_base, self.normalization = eps, rope_base, normalization
        self.qkv_norm, self.mixln_fraction, self.zero_centered = qkv_norm, mixln_fraction, zero_centered


def norm(x, p, prefix, cfg: RefConfig):
    """N(x) over the last dim with the weight (and bias) stored under ``prefix``."""
    w = p[prefix + "weight"] + (1.0 if cfg.zero_centered else 0.0)
    if cfg.normalization == "DyT":  # gamma * tanh(alpha * x) + beta, elementwise
        return torch.tanh(p[prefix + "alpha"] * x) * w + p[prefix + "bias"]
    if cfg.normalization == "RMSNorm":
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + cfg.eps) * w
    mu = x.mean(-1, keepdim=True)
    var = (x - mu).pow(2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + cfg.eps) * w + p[prefix + "bias"]


def head_norm(x, p, prefix, cfg: RefConfig):
    """x: [b, heads, s, hd]. Per head with one shared weight, or over all heads ("full")."""
    if cfg.qkv_norm == "head":
        return norm(x, p, prefix, cfg)
    b, h, s, d = x.shape
    flat = x.permute(0, 2, 1, 3).reshape(b, s, h * d)
    return norm(flat, p, prefix, cfg).reshape(b, s, h, d).permute(0, 2, 1, 3)


def rope(x, base):
    """x: [b, heads, s, d]; non-interleaved rotary embedding."""
    s, d = x.shape[2], x.shape[3]
    inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64, device=x.device) / d)
    ang = torch.outer(torch.arange(s, dtype=torch.float64, device=x.device), inv)
    ang = torch.cat([ang, ang], -1)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    rotated = torch.cat([-x2, x1], -1)
    return x * ang.cos() + rotated * ang.sin()


def attention(x, p, pre, cfg: RefConfig, qk_norm=False, v_norm=False):
    """Causal GQA attention; x: [b, s, d]. Megatron's fused QKV weight is grouped per KV head:
    [q heads of group 0, k0, v0 | q heads of group 1, k1, v1 | ...]."""
    b, s, _ = x.shape
    hd, nq, ng = cfg.head_dim, cfg.heads, cfg.groups
    per = nq // ng
    w = p[pre + "self_attention.linear_qkv.weight"].view(ng, (per + 2) * hd, cfg.hidden)
    wq = w[:, : per * hd].reshape(nq * hd, cfg.hidden)
    wk = w[:, per * hd : (per + 1) * hd].reshape(ng * hd, cfg.hidden)
    wv = w[:, (per + 1) * hd :].reshape(ng * hd, cfg.hidden)
    q = (x @ wq.T).view(b, s, nq, hd).transpose(1, 2)
    k = (x @ wk.T).view(b, s, ng, hd).transpose(1, 2)
    v = (x @ wv.T).view(b, s, ng, hd).transpose(1, 2)
    a = pre + "self_attention."
    if qk_norm:
        q = head_norm(q, p, a + "q_layernorm.", cfg)
        k = head_norm(k, p, a + "k_layernorm.", cfg)
    if v_norm:
        v = head_norm(v, p, a + "v_layernorm.", cfg)
    q, k = rope(q, cfg.rope_base), rope(k, cfg.rope_base)
    k = k.repeat_interleave(per, dim=1)
    v = v.repeat_interleave(per, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    causal = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    out = scores.softmax(-1) @ v
    out = out.transpose(1, 2).reshape(b, s, nq * hd)
    return out @ p[a + "linear_proj.weight"].T


def ffn(x, p, pre):
    gate, up = (x @ p[pre + "mlp.linear_fc1.weight"].T).chunk(2, -1)
    return (F.silu(gate) * up) @ p[pre + "mlp.linear_fc2.weight"].T


def block(scheme: str, i: int, x, p, cfg: RefConfig):
    pre = f"decoder.layers.{i}."
    N = lambda t, slot: norm(t, p, pre + slot + ".", cfg)  # noqa: E731
    if scheme in ("mixln", "mixln_official"):
        post = "postnorm" if scheme == "mixln" else "postnorm_official"
        scheme = post if i < math.floor(cfg.mixln_fraction * cfg.layers) else "prenorm"
    if scheme == "hybridnorm_star":
        scheme = "hybridnorm_first" if i == 0 else "hybridnorm"
    if scheme == "prenorm":
        y = x + attention(N(x, "input_layernorm"), p, pre, cfg)
        return y + ffn(N(y, "pre_mlp_layernorm"), p, pre)
    if scheme == "prenorm_qknorm":
        y = x + attention(N(x, "input_layernorm"), p, pre, cfg, qk_norm=True)
        return y + ffn(N(y, "pre_mlp_layernorm"), p, pre)
    if scheme == "postnorm":
        y = N(x + attention(x, p, pre, cfg), "pre_mlp_layernorm")
        return N(y + ffn(y, p, pre), "post_mlp_layernorm")
    if scheme == "postnorm_official":  # x = N(x); x = x + F(x), per sublayer
        n = N(x, "input_layernorm")
        y = n + attention(n, p, pre, cfg)
        m = N(y, "pre_mlp_layernorm")
        return m + ffn(m, p, pre)
    if scheme == "hybridnorm":
        y = x + attention(x, p, pre, cfg, qk_norm=True, v_norm=True)
        n = N(y, "pre_mlp_layernorm")
        return n + ffn(n, p, pre)
    if scheme == "hybridnorm_first":
        y = x + attention(N(x, "input_layernorm"), p, pre, cfg, qk_norm=True, v_norm=True)
        return y + ffn(N(y, "pre_mlp_layernorm"), p, pre)
    if scheme == "periln":  # Peri-LN: a norm on each sublayer's input and output
        y = x + N(attention(N(x, "input_layernorm"), p, pre, cfg), "self_attn_output_layernorm")
        return y + N(ffn(N(y, "pre_mlp_layernorm"), p, pre), "mlp_output_layernorm")
    if scheme == "olmo2":  # reordered: x + N(F(x)); Q/K norms (over all heads by default)
        y = x + N(attention(x, p, pre, cfg, qk_norm=True), "self_attn_output_layernorm")
        return y + N(ffn(y, p, pre), "mlp_output_layernorm")
    if scheme == "prenorm_lns":  # LayerNorm Scaling: each norm output / sqrt(layer, from 1)
        d = math.sqrt(i + 1)
        y = x + attention(N(x, "input_layernorm") / d, p, pre, cfg)
        return y + ffn(N(y, "pre_mlp_layernorm") / d, p, pre)
    if scheme == "deepnorm":  # N(alpha x + F(x)), alpha = (2 L)^(1/4)
        a = (2 * cfg.layers) ** 0.25
        y = N(a * x + attention(x, p, pre, cfg), "pre_mlp_layernorm")
        return N(a * y + ffn(y, p, pre), "post_mlp_layernorm")
    raise ValueError(scheme)


def forward(scheme: str, tokens, labels, p, cfg: RefConfig):
    """Returns (logits [b, s, V], per-token loss [b, s])."""
    x = p["embedding.word_embeddings.weight"][tokens]
    for i in range(cfg.layers):
        x = block(scheme, i, x, p, cfg)
    x = norm(x, p, "decoder.final_layernorm.", cfg)
    logits = x @ p["output_layer.weight"].T
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
    return logits, loss.view(labels.shape)
