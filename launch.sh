#!/usr/bin/env bash
# Run any `dept` command on every rank, under the deepspeed launcher (default) or torchrun.
#
#   ./launch.sh run recipes/quickstart.yaml              # all local GPUs; on a machine without GPUs, 2 CPU ranks
#   NPROC=4 ./launch.sh train --model ... --train_file ...    # choose the number of local ranks
#   HOSTFILE=hosts ./launch.sh run recipes/llama2_7b.yaml     # multi-node over ssh (pdsh); lines `host slots=N`
#   HOSTFILE=hosts NODE_RANK=0 MASTER_ADDR=10.0.0.1 ./launch.sh run ...   # multi-node without ssh: start the
#       same command on every node with its own NODE_RANK (0 .. nodes-1); MASTER_ADDR is node 0's address
#   LAUNCHER=torchrun NNODES=2 NODE_RANK=0 MASTER_ADDR=... ./launch.sh run ...   # torchrun, one call per node
#
# Environment: NPROC (ranks per node), MASTER_PORT (default 29500), MASTER_ADDR, HOSTFILE, NODE_RANK, NNODES,
# LAUNCHER (deepspeed | torchrun), OMP_NUM_THREADS (CPU ranks: cores / ranks by default).
set -euo pipefail

LAUNCHER=${LAUNCHER:-deepspeed}
MASTER_PORT=${MASTER_PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  NPROC=${NPROC:-$(nvidia-smi -L | wc -l)}
else
  # No GPU: DeepSpeed's CPU accelerator, gloo backend. The launcher does not limit threads per rank.
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
  NPROC=${NPROC:-2}
  cores=$(nproc)
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cores / NPROC > 0 ? cores / NPROC : 1 ))}
fi

if [[ $# -eq 0 ]]; then
  echo "usage: ./launch.sh COMMAND [ARGS...]   (COMMAND: run, train, evaluate, predict, bench; see dept --help)" >&2
  exit 2
fi

case "$LAUNCHER" in
  deepspeed)
    if [[ -n "${HOSTFILE:-}" ]]; then
      [[ -f "$HOSTFILE" ]] || { echo "error: HOSTFILE $HOSTFILE does not exist" >&2; exit 2; }
      if [[ -n "${NODE_RANK:-}" ]]; then
        exec deepspeed --hostfile "$HOSTFILE" --no_ssh --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" \
          --master_port "$MASTER_PORT" --module pipeline.cli "$@"
      fi
      exec deepspeed --hostfile "$HOSTFILE" --master_port "$MASTER_PORT" --module pipeline.cli "$@"
    fi
    exec deepspeed --num_accelerators "$NPROC" --master_port "$MASTER_PORT" --module pipeline.cli "$@"
    ;;
  torchrun)
    exec torchrun --nproc_per_node "$NPROC" --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \
      --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" -m pipeline.cli "$@"
    ;;
  *)
    echo "error: LAUNCHER must be deepspeed or torchrun, got $LAUNCHER" >&2
    exit 2
    ;;
esac
