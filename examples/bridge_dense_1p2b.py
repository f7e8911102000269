"""The paper's dense 1.2B as a Megatron-Bridge recipe, HybridNorm* by default (any scheme).

    torchrun --nproc-per-node 8 examples/bridge_dense_1p2b.py --scheme hybridnorm_star \
        --data-path /data/tokens_text_document --tokenizer meta-llama/Llama-3.2-1B \
        --output runs/bridge_dense_1p2b [--tp 1 --pp 1]

16 layers, d 2048, 32 heads / 8 KV heads, SwiGLU 8192, sequence 4096, RoPE theta 5e5, tied
embeddings, SmallInit's std, AdamW (0.9, 0.95, wd 0.1), lr 3e-4 to 3e-5 (cosine, 2000 warmup
steps), batches of 1024 x 4096 tokens for 1T tokens; the same model as
examples/train_dense_1p2b.sh gives Megatron-LM. Without --data-path it trains on Bridge's
mock data.

This recipe has not run on a GPU: its tests build and train it shrunk (2 to 4 layers, d 64) on
the CPU with local modules (tests/test_bridge.py). On GPUs it uses Transformer Engine with
bf16 (--fp8 adds FP8 through TE).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F


def dense_1p2b_config(scheme: str = "hybridnorm_star", *, output: str = "runs/bridge_dense_1p2b",
                      data_path: str | None = None, tokenizer: str | None = None,
                      tp: int = 1, pp: int = 1, fp8: bool = False,
                      transformer_impl: str = "transformer_engine", **options):
    """The ConfigContainer; ``options`` are the scheme's (``qkv_norm``, ...)."""
    from megatron.bridge.models.gpt_provider import GPTModelProvider
    from megatron.bridge.training.config import (
        CheckpointConfig,
        ConfigContainer,
        GPTDatasetConfig,
        LoggerConfig,
        OptimizerConfig,
        RNGConfig,
        SchedulerConfig,
        TokenizerConfig,
        TrainingConfig,
        ValidationConfig,
    )
    from megatron.core.distributed import DistributedDataParallelConfig

    from megatron_hybridnorm.bridge import use_scheme

    seq = 4096
    model = GPTModelProvider(
        num_layers=16, hidden_size=2048, ffn_hidden_size=8192, num_attention_heads=32,
        num_query_groups=8, seq_length=seq, position_embedding_type="rope",
        rotary_base=500000, gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, normalization="RMSNorm", layernorm_epsilon=1e-5,
        attention_dropout=0.0, hidden_dropout=0.0, init_method_std=0.01398,  # sqrt(2/(5 d))
        share_embeddings_and_output_weights=True, tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp, sequence_parallel=tp > 1,
        transformer_impl=transformer_impl, bf16=True, params_dtype=torch.bfloat16,
        fp8="hybrid" if fp8 else None, vocab_size=None if tokenizer else 100278,
    )
    train_iters = 238419  # 1e12 tokens / (1024 x 4096)
    cfg = ConfigContainer(
        model=model,
        train=TrainingConfig(train_iters=train_iters, global_batch_size=1024,
                             micro_batch_size=4),
        validation=ValidationConfig(eval_interval=2000, eval_iters=32),
        optimizer=OptimizerConfig(optimizer="adam", lr=3e-4, min_lr=3e-5, weight_decay=0.1,
                                  adam_beta1=0.9, adam_beta2=0.95, clip_grad=1.0, bf16=True,
                                  use_distributed_optimizer=True),
        scheduler=SchedulerConfig(lr_decay_style="cosine", lr_warmup_iters=2000,
                                  lr_decay_iters=train_iters, start_weight_decay=0.1,
                                  end_weight_decay=0.1, weight_decay_incr_style="constant"),
        ddp=DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=True,
                                          overlap_param_gather=True,
                                          use_distributed_optimizer=True),
        dataset=GPTDatasetConfig(random_seed=1234, seq_length=seq,
                                 blend=([data_path], None) if data_path else None,
                                 split="9999,8,2", dataloader_type="single",
                                 reset_position_ids=False, reset_attention_mask=False,
                                 eod_mask_loss=False),
        logger=LoggerConfig(log_interval=10, tensorboard_dir=os.path.join(output, "tb")),
        tokenizer=(TokenizerConfig(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=tokenizer)
                   if tokenizer else TokenizerConfig(tokenizer_type="NullTokenizer",
                                                     vocab_size=100278)),
        checkpoint=CheckpointConfig(save_interval=2000, save=os.path.join(output, "checkpoints"),
                                    load=os.path.join(output, "checkpoints"),
                                    ckpt_format="torch_dist"),
        rng=RNGConfig(seed=1234),
        mixed_precision="bf16_mixed",
    )
    return use_scheme(cfg, scheme, **options)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scheme", default="hybridnorm_star")
    p.add_argument("--output", default="runs/bridge_dense_1p2b")
    p.add_argument("--data-path", help="a Megatron indexed dataset prefix (default: mock data)")
    p.add_argument("--tokenizer", help="a Hugging Face tokenizer (default: a null tokenizer)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--fp8", action="store_true")
    args = p.parse_args(argv)
    from megatron.bridge.training.gpt_step import forward_step
    from megatron.bridge.training.pretrain import pretrain

    pretrain(dense_1p2b_config(args.scheme, output=args.output, data_path=args.data_path,
                               tokenizer=args.tokenizer, tp=args.tp, pp=args.pp, fp8=args.fp8),
             forward_step)


if __name__ == "__main__":
    main()
