#!/usr/bin/env bash
# The paper's dense 1.2B model as megatron-core's HybridModel (Megatron-LM's pretrain_hybrid.py):
# the same 16 blocks as train_dense_1p2b.sh, one '*' attention and one '-' MLP layer each.
#   bash examples/train_hybrid_dense_1p2b.sh             # HybridNorm*
#   bash examples/train_hybrid_dense_1p2b.sh prenorm     # the Pre-Norm baseline: only --spec differs
#   PATTERN='M*-M*-...' bash examples/train_hybrid_dense_1p2b.sh hybridnorm   # your own pattern
# With PP > 1 the default pattern is cut into PP equal segments with '|'; a PATTERN of your own
# carries its own '|'. Parallelism, FP8, data and output come from the environment: see lib.sh.
SCHEME=${1:-hybridnorm_star}
TP=${TP:-1} PP=${PP:-1}
source "$(dirname "$0")/lib.sh"

if [ -z "${PATTERN:-}" ]; then
  [ $((16 % PP)) = 0 ] || die "PP=$PP does not divide the 16 blocks; pass a PATTERN with '|'"
  block=$(printf '*-%.0s' $(seq $((16 / PP))))
  PATTERN=$block
  for _ in $(seq 2 "$PP"); do PATTERN="$PATTERN|$block"; done
fi

ARGS=()
dense_1p2b_args
hybrid_args "$PATTERN"
spec_args "$SCHEME"
parallel_args
impl_args
data_args 100278
output_args "hybrid_dense_1p2b_$SCHEME"
launch
