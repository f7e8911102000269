"""Where a scheme's norms sit in a hybrid layer pattern (``*-*-``, ``M-M*-``, ``*E|*E``...).

A GPT layer is two sublayers; a hybrid pattern gives each its own layer. The scheme table in
``schemes.py`` stays the one description: a pattern layer takes its half of the GPT layer's
``LayerNorms``. The attention layer ``*`` owns the input norm and the Q/K/V norms; an MLP or MoE
layer (``-``, ``E``) owns the norm between the attention and the FFN (Pre-Norm's pre-MLP norm,
and the norm whose output is also the residual: HybridNorm's n = N(y), Post-Norm's N(x + Attn))
and the norm after its own add. A pattern of ``*-`` blocks therefore computes exactly the GPT
model of the same scheme. Other layers (Mamba ``M``, gated delta net ``G``) are megatron-core's
own.

Position-dependent schemes count *blocks*: block b is the b-th attention layer of the whole
model and the MLP/MoE layer after it. HybridNorm*'s Pre-Norm block is block 0; Mix-LN's
Post-Norm blocks are the first floor(f * number of attention layers). Where a pattern leaves
that ambiguous, it is refused, and so is a Mamba or gated-delta-net layer between a special
block's attention and its MLP (it would sit inside the block); elsewhere they are allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from megatron_hybridnorm.schemes import LayerNorms, Scheme, resolve_scheme
from megatron_hybridnorm.transformer.validate import SchemeConfigError

ATTENTION, MLP, MOE, PIPE, MTP = "*", "-", "E", "|", "/"
OURS = (ATTENTION, MLP, MOE)
MEGATRONS = ("M", "G")  # built from megatron-core's hybrid stack spec, norms untouched
REFUSED = {"D": "DeepSeek sparse attention", "+": "multi-latent attention"}

ATTENTION_NORMS = ("input", "input_is_residual", "q", "k", "v", "attn_output")
MLP_NORMS = ("pre_mlp", "pre_mlp_is_residual", "mlp_output", "post_mlp")
BOTH = ("depth_scaled", "deepnorm")  # a block's own: both its layers apply them


def half(lay: LayerNorms, symbol: str) -> LayerNorms:
    """The norms of ``lay`` that a pattern layer of kind ``symbol`` owns."""
    names = (ATTENTION_NORMS if symbol == ATTENTION else MLP_NORMS) + BOTH
    return LayerNorms(**{f.name: getattr(lay, f.name) for f in fields(lay) if f.name in names})


@dataclass(frozen=True)
class PatternLayer:
    """One layer of the pattern: its symbol, its norms (None: a megatron-core layer) and its
    block (None: before the first attention layer, or not ours)."""

    symbol: str
    norms: LayerNorms | None
    block: int | None


def main_layers(pattern: str) -> str:
    """The decoder's layer symbols, pipeline separators dropped; MTP and bad symbols refused."""
    if not pattern:
        raise SchemeConfigError("the hybrid layer pattern is empty; pass one, e.g. '*-*-'")
    if MTP in pattern:
        raise SchemeConfigError(
            f"hybrid layer pattern {pattern!r}: multi-token prediction ('/...') is not supported "
            "by megatron-hybridnorm's hybrid stack; drop the MTP part of the pattern")
    layers = pattern.replace(PIPE, "")
    for symbol, what in REFUSED.items():
        if symbol in layers:
            raise SchemeConfigError(
                f"hybrid layer pattern {pattern!r}: '{symbol}' ({what}) layers are not "
                "supported by the norm schemes; use '*' attention layers")
    bad = sorted(set(layers) - set(OURS) - set(MEGATRONS))
    if bad:
        raise SchemeConfigError(f"hybrid layer pattern {pattern!r}: unknown layer symbols {bad}; "
                                f"use {', '.join(OURS + MEGATRONS)} and '|'")
    return layers


def pattern_layouts(scheme: str | Scheme, pattern: str,
                    mixln_fraction: float | None = None) -> list[PatternLayer]:
    """Every layer of ``pattern`` (the whole model's, with ``|`` where the pipeline splits it)."""
    s = resolve_scheme(scheme)
    layers = main_layers(pattern)

    def fail(msg: str):
        raise SchemeConfigError(f"norm scheme {s.name!r}, hybrid layer pattern {pattern!r}: {msg}")

    blocks, block = [], None
    for symbol in layers:
        if symbol == ATTENTION:
            block = 0 if block is None else block + 1
        blocks.append(block if symbol in OURS else None)
    num_blocks = layers.count(ATTENTION)
    num_head = s.num_head_layers(num_blocks, mixln_fraction) if s.head is not None else 0
    if s.head is not None:
        what = ("its first attention layer and the MLP after it are Pre-Norm"
                if s.head_layers is not None else "its first blocks are Post-Norm")
        if num_blocks == 0:
            fail(f"{what}, but the pattern has no attention layer ('*')")
        early = [i for i, (sym, b) in enumerate(zip(layers, blocks)) if sym in (MLP, MOE)
                 and b is None]
        if early:
            fail(f"{what}; the MLP/MoE layer {early[0]} comes before the first attention layer, "
                 "so it belongs to no block; start the pattern's blocks with '*'")
        for b in range(num_head):
            mine = [(i, sym) for i, (sym, bb) in enumerate(zip(layers, blocks)) if bb == b]
            ffns = [i for i, sym in mine if sym != ATTENTION]
            attn = mine[0][0]
            if len(ffns) != 1:
                fail(f"{what}; block {b} (the attention layer {attn}) needs exactly one MLP/MoE "
                     f"layer before the next attention layer, and has {len(ffns)}")
            inside = [i for i in range(attn + 1, ffns[0]) if layers[i] in MEGATRONS]
            if inside:
                fail(f"{what}; block {b}'s attention layer {attn} and its MLP/MoE layer "
                     f"{ffns[0]} have megatron-core's '{layers[inside[0]]}' layer {inside[0]} "
                     "between them, which would sit inside that block; put it after the "
                     "block's MLP/MoE layer (e.g. '*-M*-...')")
    out = []
    for symbol, b in zip(layers, blocks):
        if symbol not in OURS:
            out.append(PatternLayer(symbol, None, None))
            continue
        lay = s.head if b is not None and b < num_head else s.body
        out.append(PatternLayer(symbol, half(lay, symbol), b))
    return out


def check_segment(pattern: str, layer_type_list: list[str], offset: int) -> None:
    """Check that a pipeline segment (what Megatron hands a stage) is the pattern's there."""
    layers = main_layers(pattern)
    if "".join(layer_type_list) != layers[offset:offset + len(layer_type_list)]:
        raise SchemeConfigError(
            f"this pipeline stage builds the layers {''.join(layer_type_list)!r} from layer "
            f"{offset}, but the hybrid layer pattern {pattern!r} has "
            f"{layers[offset:offset + len(layer_type_list)]!r} there: the stack spec was built "
            "for another pattern than the model's; pass the model's hybrid_layer_pattern")
