"""The norm schemes, described once as data: which norm sits where in which layer.

Every spec builder reads these tables; nothing else in the package knows a scheme by name.
The equations are those of the paper's official code (see the README's scheme table).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class LayerNorms:
    """Where one transformer layer's norms sit.

    input:        N(x) feeds attention; the residual stays x            (``input_layernorm``)
    q, k, v:      per-head norms after the QKV projection, before RoPE (``self_attention.*_layernorm``)
    pre_mlp:      N(y) feeds the FFN                                    (``pre_mlp_layernorm``)
    pre_mlp_is_residual: the FFN residual is N(y) itself, not y (Post-Norm; HybridNorm's FFN)
    post_mlp:     N on the layer output                                 (``post_mlp_layernorm``)
    """

    input: bool = False
    q: bool = False
    k: bool = False
    v: bool = False
    pre_mlp: bool = False
    pre_mlp_is_residual: bool = False
    post_mlp: bool = False

    def __post_init__(self):
        if self.pre_mlp_is_residual and not self.pre_mlp:
            raise ValueError("pre_mlp_is_residual needs pre_mlp")

    @property
    def has_head_norms(self) -> bool:
        return self.q or self.k or self.v


PRE_NORM = LayerNorms(input=True, pre_mlp=True)
POST_NORM = LayerNorms(pre_mlp=True, pre_mlp_is_residual=True, post_mlp=True)
PRE_NORM_QK = replace(PRE_NORM, q=True, k=True)
HYBRID = LayerNorms(q=True, k=True, v=True, pre_mlp=True, pre_mlp_is_residual=True)
HYBRID_FIRST = replace(PRE_NORM, q=True, k=True, v=True)


@dataclass(frozen=True)
class Scheme:
    """A scheme: a layout for the first layers (``head``) and one for all others (``body``).

    ``head_layers`` is a fixed count, or None when it is ``floor(head_fraction * num_layers)``.
    """

    name: str
    body: LayerNorms
    head: LayerNorms | None = None
    head_layers: int | None = 0
    head_fraction: float | None = None
    summary: str = ""

    @property
    def has_head_norms(self) -> bool:
        return any(lay is not None and lay.has_head_norms for lay in (self.body, self.head))

    def num_head_layers(self, num_layers: int, head_fraction: float | None = None) -> int:
        if self.head is None:
            return 0
        if self.head_layers is not None:
            return min(self.head_layers, num_layers)
        return math.floor((head_fraction if head_fraction is not None else self.head_fraction) * num_layers)

    def layouts(self, num_layers: int, head_fraction: float | None = None) -> list[LayerNorms]:
        """The layout of every global layer, 0-based."""
        n_head = self.num_head_layers(num_layers, head_fraction)
        return [self.head if i < n_head else self.body for i in range(num_layers)]


SCHEME_TABLE: dict[str, Scheme] = {
    s.name: s
    for s in (
        Scheme("prenorm", PRE_NORM, summary="y = x + Attn(N(x)); out = y + FFN(N(y))"),
        Scheme("postnorm", POST_NORM, summary="y = N(x + Attn(x)); out = N(y + FFN(y))"),
        Scheme("prenorm_qknorm", PRE_NORM_QK, summary="Pre-Norm with per-head Q and K norms"),
        Scheme(
            "mixln",
            PRE_NORM,
            head=POST_NORM,
            head_layers=None,
            head_fraction=0.25,
            summary="Post-Norm in the first floor(f L) layers (f = 0.25), Pre-Norm after",
        ),
        Scheme(
            "hybridnorm",
            HYBRID,
            summary="y = x + Attn(Nq, Nk, Nv); n = N(y); out = n + FFN(n)",
        ),
        Scheme(
            "hybridnorm_star",
            HYBRID,
            head=HYBRID_FIRST,
            head_layers=1,
            summary="HybridNorm; global layer 0 is Pre-Norm and keeps its Q/K/V norms",
        ),
    )
}

SCHEMES: tuple[str, ...] = tuple(SCHEME_TABLE)


def get_scheme(name: str) -> Scheme:
    try:
        return SCHEME_TABLE[name]
    except KeyError:
        raise ValueError(
            f"unknown norm scheme {name!r}; choose one of {', '.join(SCHEMES)}"
        ) from None
