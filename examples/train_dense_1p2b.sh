#!/usr/bin/env bash
# The paper's dense 1.2B model (16 layers, d 2048, 32 heads / 8 KV heads, SwiGLU 8192,
# sequence 4096, RoPE theta 5e5, tied embeddings), 1T tokens at 1024 x 4096 tokens a batch.
#   bash examples/train_dense_1p2b.sh                 # HybridNorm*
#   bash examples/train_dense_1p2b.sh prenorm         # the Pre-Norm baseline: only --spec differs
# Parallelism, FP8, data and output come from the environment: see lib.sh.
SCHEME=${1:-hybridnorm_star}
TP=${TP:-1} PP=${PP:-1}
source "$(dirname "$0")/lib.sh"

ARGS=(
  --num-layers 16 --hidden-size 2048 --ffn-hidden-size 8192
  --num-attention-heads 32 --group-query-attention --num-query-groups 8
  --seq-length 4096 --max-position-embeddings 4096
  --position-embedding-type rope --rotary-base 500000
  --swiglu --disable-bias-linear --normalization RMSNorm --norm-epsilon 1e-5
  --attention-dropout 0.0 --hidden-dropout 0.0
  --init-method-std 0.01398            # SmallInit: sqrt(2 / (5 * 2048))
  --micro-batch-size 4 --global-batch-size 1024
  --train-iters "${TRAIN_ITERS:-238419}"  # 1e12 tokens / (1024 * 4096)
  --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine
  --lr-warmup-iters 2000               # 8.39B tokens
  --adam-beta1 0.9 --adam-beta2 0.95 --weight-decay 0.1 --clip-grad 1.0 --bf16
)
spec_args "$SCHEME"
parallel_args
impl_args
data_args 100278
output_args "dense_1p2b_$SCHEME"
launch
