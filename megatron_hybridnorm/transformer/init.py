"""SmallInit, as the paper's official code initializes every scheme.

std = sqrt(2 / (5 d)) for all weights; the attention and FFN output projections use
std / sqrt(2 L). Truncated normal at 3 sigma. The author reports that a worse init destabilizes
early HybridNorm training, so the comparisons here all start from it.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


TRUNCATION = 3.0  # standard deviations, as the official code


def truncated_normal(std: float, truncation: float = TRUNCATION):
    """An init method (Megatron's callable form) drawing N(0, std) truncated at ``truncation``
    std; 0 draws the plain normal (Megatron's default)."""
    if not truncation:
        return partial(torch.nn.init.normal_, mean=0.0, std=std)
    cut = truncation * std
    return partial(torch.nn.init.trunc_normal_, mean=0.0, std=std, a=-cut, b=cut)


def small_init_std(hidden_size: int) -> float:
    return math.sqrt(2.0 / (5.0 * hidden_size))


def apply_small_init(config: TransformerConfig, truncation: float = TRUNCATION, *,
                     blocks: int | None = None) -> TransformerConfig:
    """Set ``config``'s init methods to SmallInit, in place; returns ``config``.

    The output projections' std / sqrt(2 L) counts attention + FFN blocks: ``config.num_layers``
    for a GPTModel; pass ``blocks`` for a HybridModel, whose layers are single sublayers."""
    std = small_init_std(config.hidden_size)
    out_std = std / math.sqrt(2.0 * (blocks or config.num_layers))
    config.init_method_std = std
    config.embedding_init_method_std = std
    config.init_method = truncated_normal(std, truncation)
    config.embedding_init_method = truncated_normal(std, truncation)
    config.output_layer_init_method = truncated_normal(out_std, truncation)
    return config
