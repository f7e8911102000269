"""Megatron's TransformerLayer plus a norm on the layer output (Post-Norm's second norm)."""

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
        output = super()._forward_post_mlp(mlp_output_with_bias, residual)
        if isinstance(self.post_mlp_layernorm, IdentityOp):
            return output
        output = apply_module(self.post_mlp_layernorm)(output)
        return make_viewless_tensor(inp=output, requires_grad=output.requires_grad, keep_graph=True)
