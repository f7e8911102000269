"""One scheme's model, wrapped the way Megatron trains it: GPTModel, DDP, optimizer, LR schedule."""

from __future__ import annotations

import torch

from megatron_hybridnorm import apply_small_init, get_decoder_block_spec
from megatron_hybridnorm.harness.gpt_config import gpt_config
from megatron_hybridnorm.harness.layout_init import layout_invariant_init
from megatron_hybridnorm.schemes import get_scheme


def transformer_config(args):
    """The TransformerConfig every scheme shares (SmallInit, SwiGLU, GQA, the norm kind)."""
    bf16 = args.dtype == "bf16"
    config = gpt_config(
        num_layers=args.layers,
        hidden_size=args.hidden,
        num_attention_heads=args.heads,
        num_query_groups=args.kv_heads,
        ffn_hidden_size=args.ffn_hidden,
        normalization=args.normalization,
        tensor_model_parallel_size=args.tp,
        pipeline_model_parallel_size=args.pp,
        sequence_parallel=args.sp,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        bf16=bf16,
        gradient_accumulation_fusion=False,
    )
    return apply_small_init(config, args.init_truncation)


def build(args, scheme: str, vocab_size: int):
    """(ddp model, optimizer, lr scheduler, config) for ``scheme`` on this pipeline stage."""
    from megatron.core import parallel_state
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.models.gpt import GPTModel
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.transformer.module import Float16Module

    config = transformer_config(args)
    spec = get_decoder_block_spec(config, scheme, **scheme_options(args, scheme))
    vocab_size += (-vocab_size) % args.tp  # the vocab-parallel embedding splits it over TP ranks
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=vocab_size,
        max_sequence_length=args.seq_len,
        position_embedding_type="rope",
        rotary_base=args.rope_base,
        share_embeddings_and_output_weights=not args.untie_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )
    # the same weights at any TP/PP layout, so that parallel runs compare with one-rank runs
    layout_invariant_init(model, config, args.seed)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    if config.bf16:
        model = Float16Module(config, model)
    ddp = DistributedDataParallel(
        config,
        DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=False),
        model,
    )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=args.lr,
            min_lr=args.lr * 0.1,
            weight_decay=args.weight_decay,
            adam_beta1=0.9,
            adam_beta2=0.95,
            clip_grad=args.clip_grad,
            bf16=config.bf16,
            params_dtype=config.params_dtype,
        ),
        [ddp],
        # no overrides: every parameter decays, as the official configs' decay_norm_and_bias;
        # None: Megatron's standard overrides, which exempt biases and 1-D parameters
        config_overrides={} if args.decay_norm_and_bias else None,
    )
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=args.lr,
        min_lr=args.lr * 0.1,
        lr_warmup_steps=args.warmup,
        lr_decay_steps=args.steps,
        lr_decay_style="cosine",
        start_wd=args.weight_decay,
        end_wd=args.weight_decay,
        wd_incr_steps=args.steps,
        wd_incr_style="constant",
    )
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp.no_sync
    return ddp, optimizer, scheduler, config


def scheme_options(args, scheme: str) -> dict:
    """The flags' options that ``scheme`` takes (the others apply to other schemes of the run)."""
    return get_scheme(scheme).options_from(qkv_norm=args.qkv_norm,
                                           mixln_fraction=args.mixln_fraction)


def unwrap(ddp):
    """The GPTModel inside DDP (and Float16Module)."""
    m = ddp.module
    return m.module if hasattr(m, "module") and not hasattr(m, "decoder") else m
