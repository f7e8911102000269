"""Megatron's TransformerLayer plus the norms Megatron's lacks: one on the layer output (Post-Norm's
second norm), one on each sublayer's output before its add (Peri-LN, OLMo 2), the depth scale
of LayerNorm Scaling and DeepNorm's residual scale; with the residual add fused into the norm
that follows it.

Hand-overs between Megatron's steps, on each forward design (``compat.LAYER_HOOKS``):

- The attention's residual add, where the pre-MLP norm follows it and can fuse it
  (``_pending_add``): the attention's bias-dropout-add step stores (output, residual, bias,
  dropout) instead of adding, and the pre-MLP norm step runs ``N(residual + dropout(out + bias))``
  in one pass. Before 0.20 the step is ``self.self_attn_bda`` (replaced by ``_hand_over_bda``),
  from 0.20 the hook ``_apply_self_attn_bda_step``; the pre-MLP step is
  ``_forward_pre_mlp_layernorm``, from 0.20 the hook ``_pre_mlp_layernorm_and_residual``.
- A norm whose output is also the residual returns ``(n, n)`` and says ``returns_residual``.
  megatron-core 0.17 to 0.19 take the tuple's second item as the residual, 0.20 does when the norm
  says ``returns_residual``. 0.16 takes no tuple: there a forward hook on the norm keeps ``n``
  (``_norm_residual``) and hands Megatron only the output; the residual add takes ``n``.

Why the pending add is state and not an argument: on every version tested (0.16 to 0.20) the
residual add and the pre-MLP norm are two separate calls of Megatron's forward, and the only
thing passed between them is the sum, which fusing must not compute. The layer holds the add's
inputs for the very next call, which takes and clears them; 0.20's hooks split the same two
steps and do not open a simpler form.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
)
from megatron.core.typed_torch import apply_module
from megatron.core.utils import make_viewless_tensor

from megatron_hybridnorm import compat
from megatron_hybridnorm.compat import LayerNormBuilder
from megatron_hybridnorm.kernels.report import report_after_first_forward
from megatron_hybridnorm.norms import Norm
from megatron_hybridnorm.norms.names import DEPTH_SCALE, RESIDUAL_SCALE
from megatron_hybridnorm.schemes import LayerNorms
from megatron_hybridnorm.transformer.validate import SchemeMismatchError  # noqa: F401  (and its old path)
from megatron_hybridnorm.transformer.deepnorm import deepnorm_alpha, deepnorm_init


@dataclass
class HybridTransformerLayerSubmodules(TransformerLayerSubmodules):
    self_attn_output_layernorm: LayerNormBuilder = IdentityOp  # N(Attn(.)) before its add
    mlp_output_layernorm: LayerNormBuilder = IdentityOp  # N(FFN(.)) before its add
    post_mlp_layernorm: LayerNormBuilder = IdentityOp  # N(y + FFN(.)), after the add


class _LayerHooks:
    """megatron-core 0.20 and later: the layer's step hooks, each taken over where this layer
    fuses or changes the add and left to Megatron elsewhere."""

    def _apply_self_attn_bda_step(self, attention_output_with_bias, residual, attn_state=()):
        if not self._hands_over_attn_add:
            return super()._apply_self_attn_bda_step(attention_output_with_bias, residual,
                                                     attn_state)
        self.attn_norm_manager = None  # no offloading here (_fuses_add)
        out_with_bias, residual = self._into_add(attention_output_with_bias, residual,
                                                 self.self_attn_output_layernorm)
        return self._hand_over(out_with_bias, residual, self.hidden_dropout)

    def _pre_mlp_layernorm_and_residual(self, hidden_states):
        if self._pending_add is None:
            return super()._pre_mlp_layernorm_and_residual(hidden_states)
        n, residual = self._add_and_norm(hidden_states)
        if self.config.fp32_residual_connection:
            residual = residual.float()
        return n, residual, ()

    def _apply_mlp_bda_step(self, mlp_output_with_bias, residual, mlp_state=()):
        base = super()._apply_mlp_bda_step
        return self._post_mlp(mlp_output_with_bias, residual,
                              lambda out, res: base(out, res, mlp_state))


class _ForwardSteps:
    """megatron-core 0.16 to 0.19: the forward's pre-MLP and post-MLP steps (the attention's
    add is handed over through ``self_attn_bda``, set in ``_route_the_residual_adds``)."""

    def _forward_pre_mlp_layernorm(self, hidden_states):
        if self._pending_add is None:
            return super()._forward_pre_mlp_layernorm(hidden_states)
        return self._add_and_norm(hidden_states)

    def _forward_post_mlp(self, mlp_output_with_bias, residual):
        return self._post_mlp(mlp_output_with_bias, residual, super()._forward_post_mlp)


# megatron-core's forward design decides which of its methods the layer overrides
_MEGATRON_STEPS = _LayerHooks if compat.LAYER_HOOKS else _ForwardSteps


class HybridTransformerLayer(_MEGATRON_STEPS, TransformerLayer):
    """``TransformerLayer`` with an optional ``post_mlp_layernorm``: out = N(y + FFN(y)).

    ``norms`` (the ``LayerNorms`` layout the spec was built from) is saved in checkpoints as the
    layer's extra state; loading a checkpoint whose layer had other norms is refused.

    Where a norm directly follows a residual add (HybridNorm's FFN norm, Post-Norm's two norms),
    Megatron's bias-dropout-add runs inside the norm (``Norm.forward`` with ``residual``, one
    Triton pass on CUDA; see the module docstring for the hand-over). The norm module is still
    called, so its hooks run (its input is then the sublayer output, the residual a keyword).
    With activation offloading of the norms or a recomputed pre-MLP norm, Megatron's own path
    runs.
    """

    def __init__(
        self,
        config,
        submodules: HybridTransformerLayerSubmodules,
        *args,
        norms: LayerNorms | None = None,
        block: int | None = None,
        num_blocks: int | None = None,
        **kwargs,
    ):
        super().__init__(config, submodules, *args, **kwargs)
        self.norms = norms
        self._build_own_norms(submodules)
        self._pending_add = None  # the attention's add, waiting for the pre-MLP norm
        self._norm_residual = {}  # megatron-core 0.16: norm outputs that are the residual
        # block: what LayerNorm Scaling's depth and DeepNorm's L count (a GPT layer is a block;
        # a hybrid pattern's attention layer and the MLP after it are one)
        self._set_up_deepnorm(self.config.num_layers if num_blocks is None else num_blocks)
        self._set_up_depth_scale(self.layer_number - 1 if block is None else block)
        self._give_the_norms_this_models_tp_group()
        self._report_the_layer_not_each_norm()
        self._route_the_residual_adds()

    _OWN_NORMS = ("self_attn_output_layernorm", "mlp_output_layernorm", "post_mlp_layernorm")

    # -- set-up ----------------------------------------------------------------------------------
    def _build_own_norms(self, submodules):
        """The norms megatron-core's layer has no slot for, built as it builds its own."""
        for name in self._OWN_NORMS:
            setattr(self, name, getattr(submodules, name)(
                config=self.config,
                hidden_size=self.config.hidden_size,
                eps=self.config.layernorm_epsilon,
            ))

    def _set_up_deepnorm(self, num_blocks: int):
        """DeepNorm's residual scale alpha and its initialization (beta)."""
        self.residual_scale = None
        if self.norms is None or not self.norms.deepnorm:
            return
        self.residual_scale = deepnorm_alpha(num_blocks)
        self.deepnorm_blocks = num_blocks  # what harness.layout_init's redraw scales by
        # saved with the layer, so that a checkpoint says it (inspect, the HF export)
        self.register_buffer(RESIDUAL_SCALE, torch.tensor(self.residual_scale))
        if self.config.perform_initialization:
            deepnorm_init(self, num_blocks)

    def _set_up_depth_scale(self, block: int):
        """LayerNorm Scaling: the input and pre-MLP norms scale their output by 1/sqrt(l), l the
        block's depth counted from 1."""
        if self.norms is None or not self.norms.depth_scaled:
            return
        scale = 1.0 / math.sqrt(block + 1)
        self.register_buffer(DEPTH_SCALE, torch.tensor(scale))
        for name in ("input_layernorm", "pre_mlp_layernorm"):
            norm = getattr(self, name)
            if isinstance(norm, IdentityOp):
                continue
            if not hasattr(norm, "output_scale"):
                raise TypeError(f"{name} is {type(norm).__name__}, which cannot scale its "
                                "output (LayerNorm Scaling needs this package's norm there)")
            norm.output_scale = scale

    def _give_the_norms_this_models_tp_group(self):
        """A norm's checkpoint replica ids follow this model's TP group, not the global one."""
        tp_group = getattr(getattr(self, "pg_collection", None), "tp", None)
        if tp_group is None:
            return
        for name in ("input_layernorm", "pre_mlp_layernorm") + self._OWN_NORMS:
            norm = getattr(self, name)
            if not isinstance(norm, IdentityOp):
                norm.tp_group = tp_group

    def _report_the_layer_not_each_norm(self):
        """One line per layer after its first forward says which kernels ran."""
        for m in self.modules():
            if isinstance(m, Norm):
                m.reports_itself = False
        report_after_first_forward(self, self._report_label)

    def _route_the_residual_adds(self):
        """Which of Megatron's residual adds this layer takes over (see the module docstring):
        the attention's, handed to a pre-MLP norm that fuses it; the attention's, after its
        output norm or DeepNorm's scale; and on megatron-core 0.16, which takes no
        ``(out, residual)`` from a norm, a hook that keeps the residual."""
        pre_mlp = self.pre_mlp_layernorm
        self._hands_over_attn_add = (
            self._fuses_add(pre_mlp) and getattr(pre_mlp, "returns_residual", False)
            and not isinstance(self.self_attention, IdentityOp))  # an FFN-only layer adds nothing
        if self._hands_over_attn_add and not compat.LAYER_HOOKS:
            self.self_attn_bda = self._hand_over_bda
        self._changes_attn_add = (not isinstance(self.self_attn_output_layernorm, IdentityOp)
                                  or self.residual_scale is not None)
        if self._changes_attn_add and not isinstance(self.self_attention, IdentityOp):
            self.self_attn_bda = self._into_attn_bda(self.self_attn_bda)
        if not compat.NORM_TUPLES:
            for name in ("input_layernorm", "pre_mlp_layernorm"):
                if getattr(getattr(self, name), "returns_residual", False):
                    getattr(self, name).register_forward_hook(self._keep_norm_residual(name))
            if getattr(self.input_layernorm, "returns_residual", False):
                self.self_attn_bda = self._attn_bda_with_norm_residual(self.self_attn_bda)

    # -- what a sublayer hands its residual add: N(out + bias), alpha * residual ----------------
    def _into_add(self, out_with_bias, residual, output_norm):
        """The sublayer output through its output norm (Peri-LN, OLMo 2), the residual times
        DeepNorm's alpha; unchanged where the layer has neither."""
        if not isinstance(output_norm, IdentityOp):
            out, bias = out_with_bias
            out_with_bias = (apply_module(output_norm)(out if bias is None else out + bias), None)
        if self.residual_scale is not None:
            residual = residual * self.residual_scale
        return out_with_bias, residual

    def _into_attn_bda(self, bda):
        """Megatron's attention bias-dropout-add (or the hand-over) after ``_into_add``."""
        def with_output_norm(training: bool, fused: bool):
            inner = bda(training, fused)

            def add(out_with_bias, residual, prob):
                return inner(*self._into_add(out_with_bias, residual,
                                             self.self_attn_output_layernorm), prob)

            return add

        return with_output_norm

    def _report_label(self) -> str:
        norms = self.norms
        where = ", ".join(k for k, on in asdict(norms).items() if on) if norms else "custom"
        return f"layer {self.layer_number} (norms: {where})"

    def _fuses_add(self, norm) -> bool:
        return (
            isinstance(norm, Norm)
            and not self.offload_attn_norm
            and not self.offload_mlp_norm
            and not self.recompute_pre_mlp_layernorm
            and isinstance(self.cross_attention, IdentityOp)
            and not self.config.inference_fuse_tp_communication  # that adds inside the linears
            # per-layer CUDA graphs may capture attention and MLP apart: the attention's
            # residual add must then not wait for the MLP's norm across a graph boundary
            and self.config.cuda_graph_impl in ("none", "full_iteration")
        )

    # -- megatron-core 0.16: norms whose output is the residual ---------------------------------
    def _keep_norm_residual(self, name: str):
        def hook(module, args, output):
            out, self._norm_residual[name] = output
            return out

        return hook

    def _attn_bda_with_norm_residual(self, bda):
        def with_residual(training: bool, fused: bool):
            inner = bda(training, fused)

            def add(out_with_bias, residual, prob):
                return inner(out_with_bias, self._norm_residual.pop("input_layernorm"), prob)

            return add

        return with_residual

    # -- the attention's residual add, fused into the pre-MLP norm ------------------------------
    def _hand_over(self, out_with_bias, residual, prob):
        out, bias = out_with_bias
        self._pending_add = (out, residual, bias, prob if self.training else 0.0)
        return out

    def _hand_over_bda(self, training: bool, fused: bool):
        """Stands in for Megatron's ``get_bias_dropout_add`` before 0.20: the attention output
        goes on unchanged and (output, residual, bias, dropout probability) wait for the
        pre-MLP norm."""
        return self._hand_over

    def _add_and_norm(self, hidden_states):
        """The pre-MLP norm with the pending attention add fused in: ``(n, n)``, or ``n`` where
        megatron-core takes no tuple (its hook keeps the residual)."""
        out, residual, bias, prob = self._pending_add
        self._pending_add = None
        if out is not hidden_states:
            raise RuntimeError(
                "HybridTransformerLayer: the pre-MLP norm got another tensor than the attention "
                "output whose residual add it was to fuse; set HYBRIDNORM_KERNELS=torch and "
                "report this (a Megatron code path between attention and MLP changed it)"
            )
        self.mlp_norm_manager = None
        return apply_module(self.pre_mlp_layernorm)(
            out, residual=residual, x_bias=bias, dropout_p=prob
        )

    # -- after the MLP ---------------------------------------------------------------------------
    def _post_mlp(self, mlp_output_with_bias, residual, megatron_post_mlp):
        """The FFN's residual add and ``post_mlp_layernorm``; ``megatron_post_mlp(out, residual)``
        is Megatron's own step (bias-dropout-add and what goes with it)."""
        if "pre_mlp_layernorm" in self._norm_residual:  # megatron-core 0.16
            residual = self._norm_residual.pop("pre_mlp_layernorm")
        fc1 = getattr(self.mlp, "linear_fc1", None)
        if getattr(fc1, "keeps_norm_output", False):  # te_ffn_norm="in_linear": n is the residual
            residual = fc1.take_norm_output()
        mlp_output_with_bias, residual = self._into_add(mlp_output_with_bias, residual,
                                                        self.mlp_output_layernorm)
        norm = self.post_mlp_layernorm
        if isinstance(norm, IdentityOp):
            return megatron_post_mlp(mlp_output_with_bias, residual)
        if self._fuses_add(norm):
            self.mlp_norm_manager = None
            out, bias = mlp_output_with_bias
            prob = self.hidden_dropout if self.training else 0.0
            output = apply_module(norm)(out, residual=residual, x_bias=bias, dropout_p=prob)
        else:
            output = apply_module(norm)(megatron_post_mlp(mlp_output_with_bias, residual))
        return make_viewless_tensor(inp=output, requires_grad=output.requires_grad, keep_graph=True)

    def get_extra_state(self):
        return {"norms": asdict(self.norms) if self.norms is not None else None}

    def saved_norms(self, saved: dict):
        """This layer's layout in a checkpoint's saved one (a hybrid layer takes its half)."""
        return LayerNorms(**saved)

    def set_extra_state(self, state):
        """The guard as each layer loads: its saved norm layout must be its own."""
        saved = (state or {}).get("norms")
        if saved is None or self.norms is None:
            return
        theirs = self.saved_norms(saved)
        if theirs != self.norms:
            raise SchemeMismatchError(
                f"{self.describe()} of the checkpoint has the norms {asdict(theirs)}, this "
                f"model's has {asdict(self.norms)}: the checkpoint was saved with another norm "
                "scheme (python -m megatron_hybridnorm.inspect <checkpoint> names it)")

    def describe(self) -> str:
        return f"layer {self.layer_number - 1}"
