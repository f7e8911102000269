"""AutoBridge for the Hugging Face model this package exports (``model_type`` "hybridnorm").

The exported model keeps Megatron-Core's parameter names and layouts (``hf/modeling_hybridnorm``),
so every mapping here is name for name. What a mapping decides is how a tensor is split over
tensor-parallel ranks:
- the linears and the embedding: as Megatron's modules are (Bridge's ``AutoMapping``), but
  SwiGLU's ``linear_fc1``, which the HF model holds whole as [gate; up] while each TP rank holds
  [its gate rows; its up rows];
- every norm slot (input, Q/K/V, sublayer output, pre- and post-MLP, final; weight, bias and
  DyT's alpha): by the parameter's own tensor-parallel attribute, since a per-head norm is
  replicated and a full-width (OLMo 2) Q/K/V norm is split like the heads;
- LayerNorm Scaling's and DeepNorm's buffers, which the HF model rebuilds from its layout: on
  import they are set from that layout, on export they are checked against it and not written.
Registering happens on import of ``megatron_hybridnorm.bridge``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.bridge.models.conversion.mapping_registry import MegatronMappingRegistry
from megatron.bridge.models.conversion.model_bridge import MegatronModelBridge
from megatron.bridge.models.conversion.param_mapping import (
    AutoMapping,
    MegatronParamMapping,
    ReplicatedMapping,
)
from megatron.bridge.models.gpt_provider import GPTModelProvider
from megatron.core.models.gpt.gpt_model import GPTModel

from megatron_hybridnorm.bridge.specs import SchemeLayerSpec
from megatron_hybridnorm.hf.architecture import Architecture, ExportError
from megatron_hybridnorm.hf.convert import AUTO_MAP
from megatron_hybridnorm.hf.modeling_hybridnorm import depth_scale, residual_scale
from megatron_hybridnorm.norms.names import (
    DEPTH_SCALE,
    FUSED_NORM_PREFIX,
    NORM_MODULES,
    RESIDUAL_SCALE,
    norm_module_prefix,
)

ARCHITECTURE = "HybridNormForCausalLM"
LAYER = "decoder.layers.*."
NORM_PARAMS = ("weight", "bias", "alpha")
# what the HF model computes from a layer's layout instead of storing
LAYOUT_BUFFERS = {DEPTH_SCALE: "depth_scaled", RESIDUAL_SCALE: "deepnorm"}
_LAYOUT_PREFIX = "config.layer_norms."


class NormMapping(AutoMapping):
    """A norm's parameter, split over TP exactly when the parameter says it is."""

    def _detect_parallelism_type(self, module) -> str:
        param = getattr(module, self.megatron_param.rsplit(".", 1)[-1], None)
        if getattr(param, "tensor_model_parallel", False):
            return "column"  # a full-width Q/K/V norm: dim 0, like the heads
        return "replicated"


class FusedGatedMLPMapping(MegatronParamMapping[torch.Tensor]):
    """SwiGLU's first linear: [gate; up] whole in HF, [gate_i; up_i] on TP rank i."""

    def hf_to_megatron(self, hf_weights: torch.Tensor, megatron_module) -> torch.Tensor:
        if self.tp_size == 1:
            return hf_weights
        target = getattr(megatron_module, self.megatron_param.rsplit(".", 1)[-1])
        splits = None
        if self.tp_rank == 0:
            gate, up = hf_weights.chunk(2, dim=0)
            splits = [torch.cat(pair, dim=0) for pair in zip(gate.chunk(self.tp_size, dim=0),
                                                             up.chunk(self.tp_size, dim=0))]
        return self.scatter_to_tp_ranks(splits, target.shape, target.dtype, target.device)

    def megatron_to_hf(self, megatron_weights, megatron_module) -> dict[str, torch.Tensor]:
        weights = self.broadcast_from_pp_rank(megatron_weights, cache_key=str(self.hf_param))
        if weights is None:
            return {}
        if self.tp_size > 1:
            halves = [shard.chunk(2, dim=0) for shard in self.gather_from_tp_ranks(weights)]
            weights = torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
        return {str(self.hf_param): weights}


class LayoutBufferMapping(ReplicatedMapping):
    """A layer buffer the HF model derives from ``config.layer_norms``: the HF name is that
    layout entry. Import sets it from the layout; export checks it and writes nothing."""

    def __init__(self, megatron_param: str, hf_param: str):
        super().__init__(megatron_param, hf_param)
        self.allow_hf_name_mismatch = True

    def megatron_to_hf(self, megatron_weights, megatron_module) -> dict[str, torch.Tensor]:
        if megatron_weights is not None:
            layer, buffer = self.hf_param.split(".")[-2], self.megatron_param.rsplit(".", 1)[-1]
            expected = layout_value(megatron_module.config.num_layers, int(layer), buffer)
            if not math.isclose(float(megatron_weights), expected, rel_tol=1e-6):
                raise ExportError(
                    f"{self.megatron_param} is {float(megatron_weights)}, but the Hugging Face "
                    f"model computes {expected} from its layout: it would be another model; it "
                    "is not exported")
        return {}


def layout_value(num_layers: int, layer: int, buffer: str) -> float:
    """What the HF model computes for a layer's buffer (``layer`` 0-based)."""
    return depth_scale(layer) if buffer == DEPTH_SCALE else residual_scale(num_layers)


def provider_for(arch: Architecture, **fields) -> GPTModelProvider:
    """A ``GPTModelProvider`` of this architecture, the scheme's spec as its layer spec.
    ``transformer_impl`` is Transformer Engine where it is installed (and the norm is not
    DyT, which TE has no module for), else local; ``fields`` override."""
    from megatron.core.extensions.transformer_engine import HAVE_TE

    impl = "transformer_engine" if HAVE_TE and arch.normalization != "DyT" else "local"
    return GPTModelProvider(**{
        **arch.transformer_fields(), "vocab_size": arch.vocab_size,
        "seq_length": arch.max_position_embeddings, "add_qkv_bias": arch.add_bias_linear,
        "position_embedding_type": "rope", "rotary_base": arch.rope_base,
        "rotary_percent": arch.rotary_percent,
        "share_embeddings_and_output_weights": arch.tied_embeddings, "hidden_dropout": 0.0,
        "attention_dropout": 0.0, "transformer_impl": impl,
        "transformer_layer_spec": SchemeLayerSpec(arch.scheme, arch.options()), **fields})


def architecture_of(provider) -> Architecture:
    """The architecture of a Bridge provider built with a ``SchemeLayerSpec``."""
    spec = provider.transformer_layer_spec
    if not isinstance(spec, SchemeLayerSpec):
        raise ExportError(f"the provider's transformer_layer_spec is {spec!r}, not a "
                          "megatron_hybridnorm SchemeLayerSpec: its norm scheme is unknown")
    activation = {F.silu: "silu", F.gelu: "gelu"}.get(provider.activation_func)
    if activation is None:
        raise ExportError(f"activation {provider.activation_func}: the Hugging Face model here "
                          "computes silu and gelu")
    options = {**spec.scheme.option_defaults(), **spec.options}
    return Architecture(
        scheme=spec.scheme.name, num_layers=provider.num_layers,
        hidden_size=provider.hidden_size, num_attention_heads=provider.num_attention_heads,
        num_query_groups=provider.num_query_groups or provider.num_attention_heads,
        ffn_hidden_size=provider.ffn_hidden_size, vocab_size=provider.vocab_size,
        max_position_embeddings=provider.seq_length, head_dim=provider.kv_channels,
        qkv_norm=options.get("qkv_norm", spec.scheme.qkv_norm),
        mixln_fraction=options.get("mixln_fraction"),
        gated_linear_unit=provider.gated_linear_unit, activation=activation,
        normalization=provider.normalization, norm_eps=provider.layernorm_epsilon,
        zero_centered_gamma=provider.layernorm_zero_centered_gamma,
        add_bias_linear=provider.add_bias_linear, rope_base=provider.rotary_base,
        rotary_percent=provider.rotary_percent, rotary_interleaved=provider.rotary_interleaved,
        tied_embeddings=provider.share_embeddings_and_output_weights)


class _ParamName(str):
    """A parameter name whose ``"output_layer" in name`` means the LM head's module.

    With tied embeddings, Megatron-Bridge 0.6.2 drops every parameter name containing the
    substring "output_layer" from its conversion (``build_conversion_tasks`` and the export),
    meaning the untied LM head; that also drops ``self_attn_output_layernorm`` and
    ``mlp_output_layernorm`` (Peri-LN's and OLMo 2's norms), which would silently keep their
    initial values on import and be missing on export. Only this test changes meaning."""

    def __contains__(self, part: str) -> bool:
        if part == "output_layer":
            return part in self.split(".")
        return str.__contains__(self, part)


@MegatronModelBridge.register_bridge(source=ARCHITECTURE, target=GPTModel,
                                     provider=GPTModelProvider, model_type="hybridnorm")
class HybridNormBridge(MegatronModelBridge):
    """HybridNorm and its baselines between Hugging Face (this package's export) and Megatron."""

    ADDITIONAL_FILE_PATTERNS = ["modeling_hybridnorm.py"]

    def provider_bridge(self, hf_pretrained) -> GPTModelProvider:
        return provider_for(Architecture.from_hf_config(hf_pretrained.config))

    @classmethod
    def megatron_to_hf_config(cls, provider) -> dict:
        return architecture_of(provider).hf_config(
            auto_map=AUTO_MAP, architectures=[ARCHITECTURE], model_type="hybridnorm",
            torch_dtype="float32")

    def mapping_registry(self) -> MegatronMappingRegistry:
        names = ["embedding.word_embeddings.weight", "output_layer.weight",
                 *(f"{LAYER}{m}.{p}" for m in ("self_attention.linear_qkv",
                                               "self_attention.linear_proj", "mlp.linear_fc2")
                   for p in ("weight", "bias"))]
        mappings = [AutoMapping(n, n) for n in names]
        gated = getattr(self.hf_config, "gated_linear_unit", True)
        for p in ("weight", "bias"):
            fc1 = f"{LAYER}mlp.linear_fc1.{p}"
            mappings.append(FusedGatedMLPMapping(fc1, fc1) if gated else AutoMapping(fc1, fc1))
        # every norm slot, by its module's name (the HF model's too)
        norms = [f"{LAYER}{module}.{p}" for module in NORM_MODULES.values() for p in NORM_PARAMS]
        norms += [f"decoder.final_layernorm.{p}" for p in NORM_PARAMS]
        mappings += [NormMapping(n, n) for n in norms]
        # Transformer Engine's fused pre-norms: the HF model names them by their norm module
        mappings += [ReplicatedMapping(f"{LAYER}{fused}{p}",
                                       f"{LAYER}{norm_module_prefix(slot)}{p}")
                     for slot, fused in FUSED_NORM_PREFIX.items() for p in ("weight", "bias")]
        mappings += [LayoutBufferMapping(f"{LAYER}{buffer}", f"{_LAYOUT_PREFIX}*.{slot}")
                     for buffer, slot in LAYOUT_BUFFERS.items()]
        return MegatronMappingRegistry(*mappings)

    def _megatron_global_param_names_all_pp_ranks(self, megatron_model):
        names = super()._megatron_global_param_names_all_pp_ranks(megatron_model)
        return [_ParamName(n) for n in names]

    def maybe_modify_loaded_hf_weight(self, hf_param, hf_state_dict):
        if isinstance(hf_param, str) and hf_param.startswith(_LAYOUT_PREFIX):
            layer, slot = hf_param[len(_LAYOUT_PREFIX):].split(".")
            buffer = next(b for b, s in LAYOUT_BUFFERS.items() if s == slot)
            return torch.tensor(layout_value(self.hf_config.num_hidden_layers, int(layer), buffer))
        return super().maybe_modify_loaded_hf_weight(hf_param, hf_state_dict)
