#!/usr/bin/env bash
# The paper's MoE-1B-7B model (16 layers, d 2048, 16 heads, 64 experts of width 1024, top-8,
# dropless, load-balancing loss 1e-2, z-loss 1e-3, untied embeddings), 500B tokens.
#   bash examples/train_moe_1b7b.sh                   # HybridNorm*
#   bash examples/train_moe_1b7b.sh prenorm           # the Pre-Norm baseline
# Expert parallelism defaults to EP=8; see lib.sh for the rest.
SCHEME=${1:-hybridnorm_star}
TP=${TP:-1} PP=${PP:-1} EP=${EP:-8}
source "$(dirname "$0")/lib.sh"

ARGS=(
  --num-layers 16 --hidden-size 2048 --ffn-hidden-size 1024
  --num-attention-heads 16
  --seq-length 4096 --max-position-embeddings 4096
  --position-embedding-type rope --rotary-base 500000
  --swiglu --disable-bias-linear --normalization RMSNorm --norm-epsilon 1e-5
  --attention-dropout 0.0 --hidden-dropout 0.0 --untie-embeddings-and-output-weights
  --init-method-std 0.01398
  --num-experts 64 --moe-ffn-hidden-size 1024 --moe-router-topk 8
  --moe-router-load-balancing-type aux_loss --moe-aux-loss-coeff 1e-2 --moe-z-loss-coeff 1e-3
  --moe-token-dispatcher-type alltoall --moe-grouped-gemm
  --micro-batch-size 2 --global-batch-size 1024
  --train-iters "${TRAIN_ITERS:-119210}"  # 5e11 tokens / (1024 * 4096)
  --lr 4e-4 --min-lr 4e-5 --lr-decay-style cosine --lr-warmup-iters 2000
  --adam-beta1 0.9 --adam-beta2 0.95 --weight-decay 0.1 --clip-grad 1.0 --bf16
)
spec_args "$SCHEME"
parallel_args
impl_args
data_args 100278
output_args "moe_1b7b_$SCHEME"
launch
