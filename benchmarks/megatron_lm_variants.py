"""A --spec variant for bench_megatron_lm.py, to attribute a time difference: this package's
``prenorm`` with megatron-core's own core attention (``DotProductAttention``, which
materializes the score matrix) in place of ``SDPAttention``. Not a scheme for training.

    pretrain_gpt.py --spec megatron_lm_variants prenorm_megatron_attention (benchmarks/ on the path)
"""

from megatron.core.transformer.dot_product_attention import DotProductAttention

from megatron_hybridnorm.models.gpt.entrypoints import ENTRY_POINTS


def prenorm_megatron_attention(config, vp_stage=None):
    block = ENTRY_POINTS["prenorm"](config, vp_stage=vp_stage)
    for layer in block.layer_specs:
        layer.submodules.self_attention.submodules.core_attention = DotProductAttention
    return block
