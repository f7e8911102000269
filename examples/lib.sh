#!/usr/bin/env bash
# Shared by the launch scripts here: builds Megatron-LM pretrain_gpt.py (or pretrain_hybrid.py)
# arguments from the environment and starts one node's processes with torchrun.
#
#   MEGATRON_LM   a Megatron-LM checkout at core_v0.19.x (default /opt/Megatron-LM, as in docker/)
#   GPUS_PER_NODE (8)  NNODES (1)  NODE_RANK (0)  MASTER_ADDR (localhost)  MASTER_PORT (29500)
#   TP PP EP      tensor / pipeline / expert parallel sizes;  SP=1 sequence parallelism
#   FP8           off | delayed | tensorwise | mxfp8 | blockwise   (needs IMPL=transformer_engine)
#   IMPL          transformer_engine (default) | local
#   DATA_PATH     Megatron indexed dataset prefix(es); unset: --mock-data with a null tokenizer
#   TOKENIZER_MODEL  Hugging Face tokenizer for DATA_PATH
#   SAVE          checkpoint folder (default checkpoints/<run name>)
#   TRAIN_ITERS   override the paper's iteration count (e.g. 20 for a smoke test)
#   DRY_RUN=1     print the torchrun line (as a # comment), then the pretrain_gpt.py arguments one
#                 per line, and start nothing
#   CHECK=1       first run `python -m megatron_hybridnorm.check` on the same processes with this
#                 job's scheme, TP/PP/EP/SP, backend and FP8, and start training only if it passes
#                 (its report: CHECK_OUT, default checks/<scheme>.json)
#   HYBRIDNORM_QKV_NORM, HYBRIDNORM_MIXLN_FRACTION   scheme options (see the top-level README)
set -euo pipefail

: "${MEGATRON_LM:=/opt/Megatron-LM}" "${GPUS_PER_NODE:=8}" "${NNODES:=1}" "${NODE_RANK:=0}"
: "${MASTER_ADDR:=localhost}" "${MASTER_PORT:=29500}" "${SP:=0}" "${FP8:=off}"
: "${IMPL:=transformer_engine}"

die() { echo "error: $*" >&2; exit 2; }

# the training script and its entry points: pretrain_gpt.py (GPTModel), or pretrain_hybrid.py
# (HybridModel) once hybrid_args has run
PRETRAIN=pretrain_gpt.py
SPEC_MODULE=megatron_hybridnorm.entrypoints

# --spec: the scheme's entry point; the only flag that differs between a scheme and its baseline
spec_args() {
  case "$1" in
    prenorm|postnorm|postnorm_official|prenorm_qknorm|mixln|mixln_official|hybridnorm) ;;
    hybridnorm_star) ;;
    *) die "unknown scheme '$1'" ;;
  esac
  ARGS+=(--spec "$SPEC_MODULE" "$1")
  SPEC_SCHEME=$1
}

# the paper's dense 1.2B model and its optimizer (the number of layers is the caller's: 16 GPT
# layers, or the HybridModel pattern's)
dense_1p2b_args() {
  ARGS+=(
    --hidden-size 2048 --ffn-hidden-size 8192
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
}

# HybridModel: pretrain_hybrid.py with a layer pattern (* attention, - MLP, E MoE, M Mamba,
# | a pipeline split); the pattern sets the number of layers
hybrid_args() {  # $1: the pattern
  [ -n "$1" ] || die "the hybrid layer pattern is empty"
  PRETRAIN=pretrain_hybrid.py
  SPEC_MODULE=megatron_hybridnorm.hybrid.entrypoints
  ARGS+=(--hybrid-layer-pattern "$1")
}

check_args() {  # the check of this job's scheme, layout and backend (CHECK=1)
  CHECK_ARGS=(-m megatron_hybridnorm.check --scheme "$SPEC_SCHEME" --tp "$TP" --pp "$PP"
              --distopt --out "${CHECK_OUT:-checks/$SPEC_SCHEME.json}")
  if [ "${EP:-1}" != 1 ]; then CHECK_ARGS+=(--ep "$EP"); fi
  if [ "$SP" = 1 ]; then CHECK_ARGS+=(--sp); fi
  if [ "$IMPL" = transformer_engine ]; then CHECK_ARGS+=(--backend te); fi
  if [ "$FP8" != off ]; then CHECK_ARGS+=(--fp8 "$FP8"); fi
}

parallel_args() {
  ARGS+=(--tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
         --use-distributed-optimizer)
  if [ "${EP:-1}" != 1 ]; then ARGS+=(--expert-model-parallel-size "$EP"); fi
  if [ "$SP" = 1 ]; then
    [ "$TP" -gt 1 ] || die "SP=1 needs TP > 1"
    ARGS+=(--sequence-parallel)
  fi
}

impl_args() {
  case "$IMPL" in
    transformer_engine) ARGS+=(--transformer-impl transformer_engine) ;;
    # without TE: Megatron-LM's defaults would ask for TE's RoPE and wgrad fusions
    local) ARGS+=(--transformer-impl local --no-rope-fusion --no-gradient-accumulation-fusion) ;;
    *) die "IMPL is transformer_engine or local, not '$IMPL'" ;;
  esac
  case "$FP8" in
    off) ;;
    delayed) ARGS+=(--fp8-format hybrid --fp8-recipe delayed --fp8-amax-history-len 1024
                    --fp8-amax-compute-algo max) ;;
    tensorwise) ARGS+=(--fp8-format hybrid --fp8-recipe tensorwise) ;;
    mxfp8|blockwise) ARGS+=(--fp8-format e4m3 --fp8-recipe "$FP8") ;;
    *) die "FP8 is off, delayed, tensorwise, mxfp8 or blockwise, not '$FP8'" ;;
  esac
  if [ "$FP8" != off ] && [ "$IMPL" != transformer_engine ]; then
    die "FP8=$FP8 needs IMPL=transformer_engine"
  fi
}

data_args() {  # $1: vocabulary size of the tokenizer
  if [ -n "${DATA_PATH:-}" ]; then
    [ -n "${TOKENIZER_MODEL:-}" ] || die "DATA_PATH needs TOKENIZER_MODEL"
    # shellcheck disable=SC2206  # DATA_PATH may list several weighted prefixes
    ARGS+=(--data-path $DATA_PATH --split 99990,8,2
           --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER_MODEL")
  else
    ARGS+=(--mock-data --tokenizer-type NullTokenizer --vocab-size "$1")
  fi
}

output_args() {  # $1: run name
  ARGS+=(--save "${SAVE:-checkpoints/$1}" --load "${SAVE:-checkpoints/$1}" --ckpt-format torch_dist
         --save-interval 2000 --eval-interval 1000 --eval-iters 10 --log-interval 10)
}

launch() {
  local nodes=(--nproc-per-node "$GPUS_PER_NODE" --nnodes "$NNODES" --node-rank "$NODE_RANK"
               --master-addr "$MASTER_ADDR")
  local torchrun=(torchrun "${nodes[@]}" --master-port "$MASTER_PORT")
  if [ "${CHECK:-0}" = 1 ]; then
    check_args
    local check=(torchrun "${nodes[@]}" --master-port "$((MASTER_PORT + 1))" "${CHECK_ARGS[@]}")
    if [ "${DRY_RUN:-0}" = 1 ]; then
      echo "# check: ${check[*]}"
    else
      mkdir -p "$(dirname "${CHECK_OUT:-checks/$SPEC_SCHEME.json}")"
      "${check[@]}" || die "the check failed: no training (its table is above)"
    fi
  fi
  if [ "${DRY_RUN:-0}" = 1 ]; then
    echo "# ${torchrun[*]} $PRETRAIN"
    printf '%s\n' "${ARGS[@]}"
    return
  fi
  [ -f "$MEGATRON_LM/$PRETRAIN" ] || die "MEGATRON_LM=$MEGATRON_LM has no $PRETRAIN"
  export CUDA_DEVICE_MAX_CONNECTIONS=1
  cd "$MEGATRON_LM"
  exec "${torchrun[@]}" "$PRETRAIN" "${ARGS[@]}"
}
