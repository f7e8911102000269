"""Every megatron-core internal this package depends on, and its form in each version.

The rest of the package imports these names from here, so a new megatron-core release is a
change in this file. Features are detected (``hasattr``, imports), not read off version strings.
Tested on 0.16.1, 0.17.1, 0.18.2, 0.19.2 and 0.20.0 (Megatron-LM main at d98e8a6, 2026-08-22).

| internal | 0.16 | 0.17 | 0.18 | 0.19 | 0.20 (main) |
|---|---|---|---|---|---|
| ``TransformerLayer`` residual adds (``LAYER_HOOKS``) | ``self_attn_bda`` + ``_forward_pre_mlp_layernorm`` + ``_forward_post_mlp`` | same | same | same | hooks ``_apply_self_attn_bda_step``, ``_pre_mlp_layernorm_and_residual``, ``_apply_mlp_bda_step`` |
| a norm's ``(out, residual)`` tuple is used (``NORM_TUPLES``) | never: passed on as the output | whenever a tuple is returned | same | same | only if the norm has ``returns_residual = True`` |
| layer attributes read | ``offload_attn_norm``, ``offload_mlp_norm``, ``recompute_pre_mlp_layernorm``, ``cross_attention``, ``hidden_dropout`` | same | same | + ``mlp_norm_manager`` | + ``attn_norm_manager`` |
| the dense MLP in a layer spec (``dense_mlp_spec``) | ``ModuleSpec(module=MLP)`` | same | ``MLP.as_mlp_submodule`` | same | same |
| ``torch_norm.LayerNormBuilder`` (a type hint) | absent | present | present | present | present |
| ``models.hybrid`` (``HybridModel``, ``HybridStack``) | absent (``models.mamba``) | absent | present | present | present |
| ``dist_checkpointing.gpt_checkpoint_interop`` | absent | absent | absent | present | present |
| a ``--spec`` callable is called by Megatron-LM (``megatron.training.models.gpt.GPTModelBuilder``) | no: the object is the spec | no | no | yes, ``fn(config, vp_stage=)`` | yes |
| ``spec_utils.import_module`` on a failed import | logs, returns None | same | same | same | raises ImportError |
| ``Attention._yarn_concentration_factor`` | absent (computed per call) | absent | absent | present | present |
| ``TransformerConfig.mlp_chunks_for_training`` | absent | absent | present | present | present |
| a dist checkpoint's common state (``COMMON_STATE_IN_SHARDS``) | saved to and read from ``common.pt`` | same | same | saved inside the torch_dist shards; ``common.pt`` still read | same |
| ``finalize_model_grads`` TP reduction | SUM for ``q_layernorm``/``k_layernorm`` names and ``sequence_parallel`` params; AVG for ``average_gradients_across_tp_domain`` | same | same | same | same |
| the final norm after a layer ``ModuleSpec`` (``transformer_block.LayerNormImpl``) | TE's, Apex's or torch's norm, whichever is installed | same | same | same | same |

Touched in the same form on every version above (read where they are used, listed here so that a
release that changes one is found in one place):

- ``SelfAttention``: ``get_query_key_value_tensors(hidden_states, key_value_states, output_gate,
  split_qkv)``, ``linear_qkv``, ``num_query_groups_per_partition``,
  ``num_attention_heads_per_partition``, ``hidden_size_per_attention_head``, ``world_size``,
  ``pg_collection`` (attention.py).
- ``TELayerNormColumnParallelLinear``: ``return_layernorm_output`` (read at each forward) and
  ``te_return_bias``; ``TENorm`` and its ``_extra_state`` (norms/te.py).
- ``dist_checkpointing.strategies.filesystem_async._results_queue`` (dist_ckpt.py).
- ``models.gpt.fine_grained_callables`` calls ``pre_mlp_layernorm`` and ``mlp_bda`` directly
  under ``overlap_moe_expert_parallel_comm``: refused in validate.py.
- The CPU stand-ins (cpu.py): ``tensor_parallel.random._get_cuda_rng_state``,
  ``_set_cuda_rng_state``, ``CudaRNGStatesTracker``, ``CheckpointWithoutOutput``,
  ``moe_utils``/``token_dispatcher.maybe_move_tensor_to_cpu``.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import megatron.core
from megatron.core.transformer.transformer_layer import TransformerLayer

VERSION = megatron.core.__version__


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


# -- the transformer layer --------------------------------------------------------------------
# 0.20 split TransformerLayer's forward into hooks (Megatron-LM PR #4531); before, the residual
# adds lived in _forward_attention (self.self_attn_bda) and _forward_post_mlp.
LAYER_HOOKS = hasattr(TransformerLayer, "_apply_mlp_bda_step")


def _takes_norm_tuples() -> bool:
    """Whether the layer takes a norm's ``(out, residual)``: from 0.17 (0.16 passes the tuple
    on to the MLP). 0.17 made ``_forward_mlp`` unpack the tuple in the change that typed its
    return (``Tensor | list[Tensor | None]``); 0.16's is untyped. From 0.20 the layer's hooks
    take it (``LAYER_HOOKS``)."""
    if LAYER_HOOKS:
        return True
    import inspect

    returns = inspect.signature(TransformerLayer._forward_mlp).return_annotation
    return returns is not inspect.Signature.empty


NORM_TUPLES = _takes_norm_tuples()

# -- type hints -------------------------------------------------------------------------------
try:
    from megatron.core.transformer.torch_norm import LayerNormBuilder
except ImportError:  # 0.16
    LayerNormBuilder = Any

# -- the dense MLP's spec ---------------------------------------------------------------------
def dense_mlp_spec(submodules):
    """A TransformerLayer's dense MLP: ``MLP.as_mlp_submodule`` (a builder taking the layer's
    process groups) from 0.18, ``ModuleSpec(module=MLP)`` before."""
    from megatron.core.transformer.mlp import MLP

    if hasattr(MLP, "as_mlp_submodule"):
        from functools import partial

        return partial(MLP.as_mlp_submodule, submodules=submodules)
    from megatron.core.transformer.spec_utils import ModuleSpec

    return ModuleSpec(module=MLP, submodules=submodules)


# -- models -----------------------------------------------------------------------------------
HAVE_HYBRID_MODEL = _has_module("megatron.core.models.hybrid")
HAVE_GPT_CHECKPOINT_INTEROP = _has_module("megatron.core.dist_checkpointing.gpt_checkpoint_interop")
HYBRID_MODEL_SINCE = "0.18"


def require_hybrid_model(what: str = "HybridModel support") -> None:
    """A clear error where megatron-core has no ``HybridModel``."""
    if not HAVE_HYBRID_MODEL:
        raise ImportError(
            f"{what} needs megatron-core >= {HYBRID_MODEL_SINCE} (megatron.core.models.hybrid); "
            f"this is megatron-core {VERSION}: upgrade megatron-core, or use the GPT specs "
            "(megatron_hybridnorm.get_decoder_block_spec with GPTModel)")


def require_gpt_checkpoint_interop() -> None:
    if not HAVE_GPT_CHECKPOINT_INTEROP:
        raise ImportError(
            "loading a GPT checkpoint into a HybridModel needs megatron-core >= 0.19 "
            f"(megatron.core.dist_checkpointing.gpt_checkpoint_interop); this is {VERSION}")


# -- dist checkpoints -------------------------------------------------------------------------
# 0.19 moved a dist checkpoint's common state (Megatron-LM's args, iteration, RNG, ...) from
# common.pt into the torch_dist shards. It still reads common.pt; 0.16 to 0.18 read only that,
# and fail on a newer checkpoint with a bare FileNotFoundError deep in their loader.
def _reads_common_state_in_shards() -> bool:
    from megatron.core.dist_checkpointing import serialization

    return hasattr(serialization, "_legacy_common_state_exists")


COMMON_STATE_IN_SHARDS = _reads_common_state_in_shards()
COMMON_STATE_FILE = "common.pt"


# -- Megatron-LM's --spec ---------------------------------------------------------------------
# 0.19 and later build GPT models through megatron.training.models.gpt.GPTModelBuilder, which
# calls a --spec callable with (config, vp_stage=...). Before, Megatron-LM's gpt_builders.py
# hands the imported object to GPTModel as the spec itself.
SPEC_CALLABLES_ARE_CALLED = _has_module("megatron.training.models.gpt")


def import_module(module_path: tuple[str, str]):
    """megatron-core's ``spec_utils.import_module``, raising on a failed import in every
    version (0.20 raises; earlier versions log and return None)."""
    from megatron.core.transformer.spec_utils import import_module as megatron_import

    found = megatron_import(module_path)
    if found is None:
        raise ImportError(f"could not import {module_path[1]!r} from {module_path[0]!r}")
    return found


# -- attention --------------------------------------------------------------------------------
def yarn_mscale(attention) -> float:
    """The YaRN magnitude scale that megatron-core applies with RoPE: an attribute from 0.19,
    computed from the config at each call before."""
    mscale = getattr(attention, "_yarn_concentration_factor", None)
    if mscale is not None:
        return mscale
    from megatron.core.transformer import attention as attention_module

    compute = getattr(attention_module, "_yarn_get_concentration_factor_from_config", None)
    return 1.0 if compute is None else compute(attention.config)

