"""Megatron-Bridge support (the optional ``[bridge]`` extra): the schemes as layer specs of its
model configs, a scheme put into a recipe's ``ConfigContainer``, and an AutoBridge for this
package's Hugging Face export. Importing it registers the AutoBridge."""

from megatron_hybridnorm.extras import require

require("bridge", "megatron_hybridnorm.bridge")

from megatron_hybridnorm.bridge.specs import SCHEME_LAYER_SPECS, SchemeLayerSpec  # noqa: E402
from megatron_hybridnorm.bridge.conversion import HybridNormBridge, provider_for  # noqa: E402
from megatron_hybridnorm.bridge.recipe import use_scheme  # noqa: E402

__all__ = ["SCHEME_LAYER_SPECS", "SchemeLayerSpec", "HybridNormBridge", "provider_for",
           "use_scheme"]
