#!/usr/bin/env bash
# The paper's dense 1.2B model (16 layers, d 2048, 32 heads / 8 KV heads, SwiGLU 8192,
# sequence 4096, RoPE theta 5e5, tied embeddings), 1T tokens at 1024 x 4096 tokens a batch.
#   bash examples/train_dense_1p2b.sh                 # HybridNorm*
#   bash examples/train_dense_1p2b.sh prenorm         # the Pre-Norm baseline: only --spec differs
# Parallelism, FP8, data and output come from the environment: see lib.sh.
SCHEME=${1:-hybridnorm_star}
TP=${TP:-1} PP=${PP:-1}
source "$(dirname "$0")/lib.sh"

ARGS=(--num-layers 16)
dense_1p2b_args
spec_args "$SCHEME"
parallel_args
impl_args
data_args 100278
output_args "dense_1p2b_$SCHEME"
launch
