"""Megatron's TransformerLayer plus a norm on the layer output (Post-Norm's second norm)."""

from __future__ import annotations

from dataclasses import dataclass

from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.torch_norm import LayerNormBuilder
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
)
from megatron.core.typed_torch import apply_module
from megatron.core.utils import make_viewless_tensor


@dataclass
class HybridTransformerLayerSubmodules(TransformerLayerSubmodules):
    post_mlp_layernorm: LayerNormBuilder = IdentityOp


class HybridTransformerLayer(TransformerLayer):
    """``TransformerLayer`` with an optional ``post_mlp_layernorm``: out = N(y + FFN(y))."""

    def __init__(self, config, submodules: HybridTransformerLayerSubmodules, *args, **kwargs):
        super().__init__(config, submodules, *args, **kwargs)
        self.post_mlp_layernorm = submodules.post_mlp_layernorm(
            config=self.config,
            hidden_size=self.config.hidden_size,
            eps=self.config.layernorm_epsilon,
        )

    def _forward_post_mlp(self, mlp_output_with_bias, residual):
        output = super()._forward_post_mlp(mlp_output_with_bias, residual)
        if isinstance(self.post_mlp_layernorm, IdentityOp):
            return output
        output = apply_module(self.post_mlp_layernorm)(output)
        return make_viewless_tensor(inp=output, requires_grad=output.requires_grad, keep_graph=True)
