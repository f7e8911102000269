"""Megatron's TransformerLayer plus a norm on the layer output (Post-Norm's second norm), with
the residual add fused into the norm that follows it."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.torch_norm import LayerNormBuilder
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
)
from megatron.core.typed_torch import apply_module
from megatron.core.utils import make_viewless_tensor

from .kernels.report import report_after_first_forward
from .norms import Norm
from .schemes import LayerNorms


class SchemeMismatchError(RuntimeError):
    """A checkpoint holds another norm scheme than the model it is loaded into."""


@dataclass
class HybridTransformerLayerSubmodules(TransformerLayerSubmodules):
    post_mlp_layernorm: LayerNormBuilder = IdentityOp


class HybridTransformerLayer(TransformerLayer):
    """``TransformerLayer`` with an optional ``post_mlp_layernorm``: out = N(y + FFN(y)).

    ``norms`` (the ``LayerNorms`` layout the spec was built from) is saved in checkpoints as the
    layer's extra state; loading a checkpoint whose layer had other norms is refused.

    Where a norm directly follows a residual add (HybridNorm's FFN norm, Post-Norm's two norms),
    Megatron's bias-dropout-add runs inside the norm (``Norm.forward`` with ``residual``, one
    Triton pass on CUDA): ``self_attn_bda`` hands its inputs over to the pre-MLP norm instead of
    adding, and the MLP's output goes straight into ``post_mlp_layernorm``. The norm module is
    still called, so its hooks run (its input is then the sublayer output, the residual a
    keyword). With activation offloading of the norms or a recomputed pre-MLP norm, Megatron's
    own path runs.
    """

    def __init__(
        self,
        config,
        submodules: HybridTransformerLayerSubmodules,
        *args,
        norms: LayerNorms | None = None,
        **kwargs,
    ):
        super().__init__(config, submodules, *args, **kwargs)
        self.norms = norms
        self.post_mlp_layernorm = submodules.post_mlp_layernorm(
            config=self.config,
            hidden_size=self.config.hidden_size,
            eps=self.config.layernorm_epsilon,
        )
        self._pending_add = None
        for m in self.modules():
            if isinstance(m, Norm):
                m.reports_itself = False
        report_after_first_forward(self, self._report_label)
        pre_mlp = self.pre_mlp_layernorm
        if (self._fuses_add(pre_mlp) and getattr(pre_mlp, "returns_residual", False)
                and not isinstance(self.self_attention, IdentityOp)):  # an FFN-only layer adds nothing
            self.self_attn_bda = self._hand_over_bda

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

    def _hand_over_bda(self, training: bool, fused: bool):
        """Stands in for Megatron's ``get_bias_dropout_add``: the attention output goes on
        unchanged and (output, residual, bias, dropout probability) wait for the pre-MLP norm."""

        def hand_over(out_with_bias, residual, prob):
            out, bias = out_with_bias
            self._pending_add = (out, residual, bias, prob if training else 0.0)
            return out

        return hand_over

    def _forward_pre_mlp_layernorm(self, hidden_states):
        if self._pending_add is None:
            return super()._forward_pre_mlp_layernorm(hidden_states)
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

    def get_extra_state(self):
        return {"norms": asdict(self.norms) if self.norms is not None else None}

    def set_extra_state(self, state):
        saved = (state or {}).get("norms")
        mine = asdict(self.norms) if self.norms is not None else None
        if saved is not None and mine is not None and saved != mine:
            raise SchemeMismatchError(
                f"layer {self.layer_number - 1} of the checkpoint has the norms {saved}, this "
                f"model's has {mine}: the checkpoint was saved with another norm scheme "
                "(python -m megatron_hybridnorm.inspect <checkpoint> names it)"
            )

    def _forward_post_mlp(self, mlp_output_with_bias, residual):
        fc1 = getattr(self.mlp, "linear_fc1", None)
        if getattr(fc1, "keeps_norm_output", False):  # te_ffn_norm="in_linear": n is the residual
            residual = fc1.take_norm_output()
        norm = self.post_mlp_layernorm
        if isinstance(norm, IdentityOp):
            return super()._forward_post_mlp(mlp_output_with_bias, residual)
        if self._fuses_add(norm):
            self.mlp_norm_manager = None
            out, bias = mlp_output_with_bias
            prob = self.hidden_dropout if self.training else 0.0
            output = apply_module(norm)(out, residual=residual, x_bias=bias, dropout_p=prob)
        else:
            output = super()._forward_post_mlp(mlp_output_with_bias, residual)
            output = apply_module(norm)(output)
        return make_viewless_tensor(inp=output, requires_grad=output.requires_grad, keep_graph=True)
