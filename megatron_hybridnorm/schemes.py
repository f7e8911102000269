"""The norm schemes, described once as data: which norm sits where in which layer, and whose
form each one is.

Every spec builder reads these tables, and the README's scheme table is ``markdown_table()``;
nothing else in the package knows a scheme by name. The forms: HybridNorm, HybridNorm*,
Pre-Norm and Pre-Norm + QK-Norm are the paper's equations as its official code computes them;
Post-Norm and Mix-LN come in the textbook form and in the official code's form, which differ
at the ends of the stack (see ``Scheme.form``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class LayerNorms:
    """Where one transformer layer's norms sit.

    input:        N(x) feeds attention; the residual stays x            (``input_layernorm``)
    input_is_residual: the attention residual is N(x) itself, not x (the official Post-Norm)
    q, k, v:      per-head norms after the QKV projection, before RoPE (``self_attention.*_layernorm``)
    pre_mlp:      N(y) feeds the FFN                                    (``pre_mlp_layernorm``)
    pre_mlp_is_residual: the FFN residual is N(y) itself, not y (Post-Norm; HybridNorm's FFN)
    post_mlp:     N on the layer output, after the FFN's residual add   (``post_mlp_layernorm``)
    attn_output:  N on the attention output, before its residual add    (``self_attn_output_layernorm``)
    mlp_output:   N on the FFN output, before its residual add          (``mlp_output_layernorm``)
    depth_scaled: the input and pre-MLP norm outputs times 1/sqrt(l), l the 1-based block
                  (LayerNorm Scaling)
    deepnorm:     both residuals times alpha = (2 L)^(1/4) before their add, L the number of
                  blocks, and DeepNet's init (``transformer/deepnorm.py``)

    The two output norms are Gemma 2's ``post_attention_layernorm`` and
    ``post_feedforward_layernorm`` (Megatron-Bridge's Gemma puts them in ``linear_proj`` and
    ``linear_fc2``). They are not called ``post_*``: ``post_mlp_layernorm`` already names the
    norm after the add, and keeps that name and meaning, so checkpoints of earlier releases load
    unchanged; the new names say that they normalize the sublayer's output, as ``self_attn_bda``
    and ``mlp_bda`` name the add that follows.
    """

    input: bool = False
    input_is_residual: bool = False
    q: bool = False
    k: bool = False
    v: bool = False
    pre_mlp: bool = False
    pre_mlp_is_residual: bool = False
    post_mlp: bool = False
    attn_output: bool = False
    mlp_output: bool = False
    depth_scaled: bool = False
    deepnorm: bool = False

    def __post_init__(self):
        if self.pre_mlp_is_residual and not self.pre_mlp:
            raise ValueError("pre_mlp_is_residual needs pre_mlp")
        if self.input_is_residual and not self.input:
            raise ValueError("input_is_residual needs input")
        if self.depth_scaled and (self.input_is_residual or self.pre_mlp_is_residual):
            raise ValueError("depth_scaled scales the norms that feed a sublayer; a norm whose "
                             "output is the residual is not one")

    @property
    def has_head_norms(self) -> bool:
        return self.q or self.k or self.v


PRE_NORM = LayerNorms(input=True, pre_mlp=True)
POST_NORM = LayerNorms(pre_mlp=True, pre_mlp_is_residual=True, post_mlp=True)
# the official code's Post-Norm: each sublayer normalizes its input and adds to that (x = N(x);
# x = x + F(x)); layer 0's input norm is the embedding norm, the final norm the only one after
POST_NORM_OFFICIAL = LayerNorms(input=True, input_is_residual=True, pre_mlp=True,
                                pre_mlp_is_residual=True)
PRE_NORM_QK = replace(PRE_NORM, q=True, k=True)
HYBRID = LayerNorms(q=True, k=True, v=True, pre_mlp=True, pre_mlp_is_residual=True)
HYBRID_FIRST = replace(PRE_NORM, q=True, k=True, v=True)
PERI_NORM = LayerNorms(input=True, attn_output=True, pre_mlp=True, mlp_output=True)
# OLMo 2: no norm feeds a sublayer; each sublayer's output is normed before its add
REORDERED = LayerNorms(q=True, k=True, attn_output=True, mlp_output=True)
PRE_NORM_SCALED = replace(PRE_NORM, depth_scaled=True)
DEEP_NORM = replace(POST_NORM, deepnorm=True)


# each option's default, where a scheme takes it (a scheme's own ``qkv_norm`` and Mix-LN's
# fraction come from its row): the one table every builder, tool and exporter reads
OPTION_DEFAULTS = {"qkv_norm": "head", "te_ffn_norm": "te"}


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
    attention: str = ""  # the README table's equations
    ffn: str = ""
    form: str = ""  # whose form this is, and where it differs from the others
    qkv_norm: str = "head"  # the default span of its Q/K/V norms ("full": over all heads)

    @property
    def has_head_norms(self) -> bool:
        return any(lay is not None and lay.has_head_norms for lay in (self.body, self.head))

    def option_defaults(self) -> dict:
        """The options this scheme takes, with their defaults: the one answer, for the spec
        builders, the entry points, the training command and the export, to whether an option
        applies (Q/K/V norms take ``qkv_norm``, Mix-LN its fraction, a norm whose output is the
        residual ``te_ffn_norm``)."""
        known = {}
        if self.has_head_norms:
            known["qkv_norm"] = self.qkv_norm
        if self.head_fraction is not None:
            known["mixln_fraction"] = self.head_fraction
        if any(lay is not None and lay.pre_mlp_is_residual for lay in (self.body, self.head)):
            known["te_ffn_norm"] = OPTION_DEFAULTS["te_ffn_norm"]
        return known

    def options_from(self, **given) -> dict:
        """Of ``given`` (None: not given), the options this scheme takes."""
        takes = self.option_defaults()
        return {k: v for k, v in given.items() if v is not None and k in takes}

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


_PAPER = "the paper's equations, in the official code's form"
_MIX = "Post-Norm in the first floor(0.25 L) layers, Pre-Norm in the rest"

SCHEME_TABLE: dict[str, Scheme] = {
    s.name: s
    for s in (
        Scheme("prenorm", PRE_NORM, summary="y = x + Attn(N(x)); out = y + FFN(N(y))",
               attention="y = x + Attn(N(x))", ffn="out = y + FFN(N(y))", form=_PAPER),
        Scheme("postnorm", POST_NORM, summary="y = N(x + Attn(x)); out = N(y + FFN(y))",
               attention="y = N(x + Attn(x))", ffn="out = N(y + FFN(y))",
               form="textbook; unlike the official code: no embedding norm, and two norms in "
                    "a row at the end (the last layer's, then the final norm)"),
        Scheme("postnorm_official", POST_NORM_OFFICIAL,
               summary="n = N(x); y = n + Attn(n); m = N(y); out = m + FFN(m)",
               attention="n = N(x); y = n + Attn(n)", ffn="m = N(y); out = m + FFN(m)",
               form="the official code's Post-Norm (x = N(x); x = x + F(x) per sublayer): the "
                    "textbook's inside, with an embedding norm (layer 0's) and one final norm"),
        Scheme("prenorm_qknorm", PRE_NORM_QK, summary="Pre-Norm with per-head Q and K norms",
               attention="y = x + Attn(N(x)), q and k normed", ffn="as Pre-Norm", form=_PAPER),
        Scheme(
            "mixln",
            PRE_NORM,
            head=POST_NORM,
            head_layers=None,
            head_fraction=0.25,
            summary="Post-Norm in the first floor(f L) layers (f = 0.25), Pre-Norm after",
            attention=_MIX, form="textbook Post-Norm layers: the last hands a normalized "
                                 "N(y + FFN(y)) to the first Pre-Norm layer",
        ),
        Scheme(
            "mixln_official",
            PRE_NORM,
            head=POST_NORM_OFFICIAL,
            head_layers=None,
            head_fraction=0.25,
            summary="official Post-Norm in the first floor(f L) layers (f = 0.25), Pre-Norm after",
            attention=_MIX, form="the official code's: its Post-Norm layers, the last handing "
                                 "an un-normalized m + FFN(m) to the first Pre-Norm layer",
        ),
        Scheme(
            "hybridnorm",
            HYBRID,
            summary="y = x + Attn(Nq, Nk, Nv); n = N(y); out = n + FFN(n)",
            attention="y = x + Attn(Nq(xWq), Nk(xWk), Nv(xWv)), no input norm",
            ffn="n = N(y); out = n + FFN(n)", form=_PAPER,
        ),
        Scheme(
            "hybridnorm_star",
            HYBRID,
            head=HYBRID_FIRST,
            head_layers=1,
            summary="HybridNorm; global layer 0 is Pre-Norm and keeps its Q/K/V norms",
            attention="HybridNorm, but global layer 0 is Pre-Norm in both sublayers and keeps "
                      "Nq, Nk, Nv", form=_PAPER,
        ),
        # the baselines teams compare against; each in its own source's form
        Scheme(
            "periln",
            PERI_NORM,
            summary="Peri-LN: y = x + N(Attn(N(x))); out = y + N(FFN(N(y)))",
            attention="y = x + N(Attn(N(x)))", ffn="out = y + N(FFN(N(y)))",
            form="Peri-LN (Kim et al. 2025, arXiv 2502.02732), the sandwich of Gemma 2 and 3: "
                 "a norm on each sublayer's input and output; no embedding norm",
        ),
        Scheme(
            "olmo2",
            REORDERED,
            qkv_norm="full",
            summary="OLMo 2: y = x + N(Attn(x)), q and k normed over all heads; out = y + N(FFN(y))",
            attention="y = x + N(Attn(x)), Nq and Nk over the whole projection",
            ffn="out = y + N(FFN(y))",
            form="OLMo 2's reordered norm (OLMo 2 report, arXiv 2501.00656): no norm on a "
                 "sublayer's input; qkv_norm=\"full\" by default (\"head\" on request)",
        ),
        Scheme(
            "prenorm_lns",
            PRE_NORM_SCALED,
            summary="LayerNorm Scaling: y = x + Attn(N(x) / sqrt(l)); out = y + FFN(N(y) / sqrt(l))",
            attention="y = x + Attn(N(x) / sqrt(l)), l the 1-based layer",
            ffn="out = y + FFN(N(y) / sqrt(l))",
            form="LayerNorm Scaling (Sun et al. 2025, \"The Curse of Depth\", arXiv 2502.05795): "
                 "Pre-Norm, each sublayer's norm output scaled by its layer's depth",
        ),
        Scheme(
            "deepnorm",
            DEEP_NORM,
            summary="DeepNorm: y = N(a x + Attn(x)); out = N(a y + FFN(y)), a = (2L)^(1/4)",
            attention="y = N(a x + Attn(x)), a = (2L)^(1/4)", ffn="out = N(a y + FFN(y))",
            form="DeepNorm (Wang et al. 2022, DeepNet, arXiv 2203.00555), decoder-only: "
                 "textbook Post-Norm with the residual scaled by a; the value, output and FFN "
                 "weights drawn times b = (8L)^(-1/4)",
        ),
    )
}

SCHEMES: tuple[str, ...] = tuple(SCHEME_TABLE)


def resolve_scheme(scheme: str | Scheme) -> Scheme:
    """A public entry point's ``scheme``, a name or a ``Scheme``, as the ``Scheme``: resolved
    once, at the top; what the entry point calls below takes the object."""
    return scheme if isinstance(scheme, Scheme) else get_scheme(scheme)


def get_scheme(name: str) -> Scheme:
    try:
        return SCHEME_TABLE[name]
    except KeyError:
        raise ValueError(
            f"unknown norm scheme {name!r}; choose one of {', '.join(SCHEMES)}"
        ) from None


def markdown_table() -> str:
    """The README's scheme table, from this module's descriptions."""
    rows = ["| scheme | attention sublayer | FFN sublayer | form |", "|---|---|---|---|"]
    rows += [f"| `{s.name}` | {s.attention} | {s.ffn} | {s.form} |" for s in SCHEME_TABLE.values()]
    return "\n".join(rows)
