#!/usr/bin/env bash
# Shared by the sbatch scripts: one srun task per node runs a launch script, which starts
# torchrun for that node's GPUs; the first node is the rendezvous master.
run_on_nodes() {  # $1: launch script, $2: scheme
  local master
  master=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)  # sed reads all: no SIGPIPE
  export MASTER_ADDR=$master MASTER_PORT=${MASTER_PORT:-29500} NNODES=$SLURM_NNODES
  export GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-8}
  local container=()
  if [ -n "${CONTAINER:-}" ]; then
    container=(--container-image "$CONTAINER" --container-mounts "${CONTAINER_MOUNTS:-$PWD:$PWD}"
               --container-workdir "$PWD")
  fi
  # NODE_RANK is each task's node id, read inside the task
  srun --ntasks-per-node=1 "${container[@]}" bash -c \
    'NODE_RANK=$SLURM_NODEID exec bash "$0" "$1"' "$1" "$2"
}
