"""Transformer Engine norms for the residual stream (used by the TE backend).

The per-head Q/K/V norms stay ours on the TE backend too: TE's RMSNorm backward is slow for
rows of width head_dim (its weight-gradient finalize alone cost 3.6 ms per step on the paper's
1.2B block on an H200 with TE 2.20.2, measured 2026-11-27).

TE 2.x's standalone norms keep an ``_extra_state`` entry (quantization metadata a standalone,
high-precision norm does not use) that the local norms do not have, so a checkpoint of one
backend lacked keys the other asked for. The TE norms here leave it out of dist checkpoints and
do not ask for it when loading: local and TE checkpoints interchange, in both directions.

Two kinds of state are handed over here, and why no simpler form works:

- ``__class__`` swaps (``interchangeable``, ``as_post_norm``): megatron-core's ``TENorm`` is a
  factory that returns TE's own ``RMSNorm``/``LayerNorm`` instance, not a class one can
  subclass in a spec. To change what such an instance saves, or make it return ``(n, n)``, the
  built instance gets a cached subclass of its own class; parameters, names, hooks and TE's
  kernel stay. Wrapping it in another module would add a level to every parameter name and
  break checkpoint names.
- ``_norm_output`` (``te_norm_linear_keeping_norm``): TE's fused norm + linear returns its norm
  output beside the linear's output, but Megatron's MLP calls the linear and passes on only
  ``(out, bias)``. The linear keeps the norm output until the layer takes it
  (``take_norm_output``) as the FFN's residual, within the same forward; taking it twice, or
  before the linear ran, raises. No megatron-core version tested (0.16 to 0.20) lets an MLP
  return a third value, so the hand-over stays.
"""

from __future__ import annotations

import functools


@functools.cache
def _returning_residual(cls: type) -> type:
    """A subclass of a norm class whose forward returns ``(n, n)``."""

    class PostNormOf(cls):
        returns_residual = True

        def forward(self, x, *args, **kwargs):
            n = super().forward(x, *args, **kwargs)
            return n, n

    PostNormOf.__name__ = PostNormOf.__qualname__ = f"PostNorm[{cls.__name__}]"
    return PostNormOf


@functools.cache
def _without_checkpointed_extra_state(cls: type) -> type:
    """A subclass of a norm class that keeps its ``_extra_state`` out of dist checkpoints and
    loads without one."""
    from megatron.core import parallel_state
    from megatron.core.transformer.utils import (
        ensure_metadata_has_dp_cp_group,
        make_sharded_tensors_for_checkpoint,
    )

    class InterchangeableNorm(cls):
        def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
            metadata = ensure_metadata_has_dp_cp_group(metadata)
            state = {k: v for k, v in self.state_dict(prefix="", keep_vars=True).items()
                     if not k.endswith("_extra_state")}
            return make_sharded_tensors_for_checkpoint(
                state, prefix, {}, sharded_offsets,
                tp_group=getattr(self, "tp_group", None)
                or parallel_state.get_tensor_model_parallel_group(),
                dp_cp_group=metadata["dp_cp_group"])

        def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                  unexpected_keys, error_msgs):
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                          missing_keys, unexpected_keys, error_msgs)
            if prefix + "_extra_state" in missing_keys:
                missing_keys.remove(prefix + "_extra_state")

    InterchangeableNorm.__name__ = InterchangeableNorm.__qualname__ = cls.__name__
    return InterchangeableNorm


def interchangeable(norm):
    """Let a norm module's dist checkpoints interchange with the local norms' (see above),
    keeping its parameters, their names and its kernel."""
    norm.__class__ = _without_checkpointed_extra_state(type(norm))
    return norm


def InterchangeableTENorm(config, hidden_size: int, eps: float = 1e-5):
    """Megatron's ``TENorm`` (TE's fused RMSNorm/LayerNorm), its checkpoints interchangeable
    with the local backend's."""
    from megatron.core.extensions.transformer_engine import TENorm

    return interchangeable(TENorm(config=config, hidden_size=hidden_size, eps=eps))


def as_post_norm(norm):
    """Turn a norm module into one whose output is also the residual, keeping its parameters,
    their names and its kernel."""
    norm.__class__ = _returning_residual(type(norm))
    return norm


def TEPostNorm(config, hidden_size: int, eps: float = 1e-5):
    """``InterchangeableTENorm``, returning ``(n, n)``."""
    return as_post_norm(InterchangeableTENorm(config, hidden_size, eps))


@functools.cache
def te_norm_linear_keeping_norm() -> type:
    """Megatron's ``TELayerNormColumnParallelLinear`` that also hands over its norm output, for
    a norm whose output is the residual (HybridNorm's FFN, ``te_ffn_norm="in_linear"``).

    TE's ``return_layernorm_output`` returns the normalized input beside the linear's output
    (megatron-core's wrapper fixes it to False at construction; it is read at every forward).
    The layer takes it as the FFN's residual (``take_norm_output``). TE 2.x then computes the
    norm in high precision and casts it to FP8 separately, as a separate norm module would."""
    from megatron.core.extensions.transformer_engine import TELayerNormColumnParallelLinear

    class TENormLinearKeepingNorm(TELayerNormColumnParallelLinear):
        keeps_norm_output = True

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.return_layernorm_output = True
            self._norm_output = None

        def forward(self, x):
            result = super().forward(x)
            if self.te_return_bias:  # TE: (out, bias, norm output)
                out, bias, self._norm_output = result
            else:  # TE: (out, norm output); megatron-core adds bias=None
                (out, self._norm_output), bias = result
            return out, bias

        def take_norm_output(self):
            n, self._norm_output = self._norm_output, None
            if n is None:
                raise RuntimeError("TENormLinearKeepingNorm: no norm output to take; the layer "
                                   "must run this linear before its residual add")
            return n

    return TENormLinearKeepingNorm
