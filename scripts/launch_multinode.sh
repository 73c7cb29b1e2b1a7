#!/usr/bin/env bash
# Launch a umarvel stage on several nodes. Run the same command on every node.
#
#   NNODES=8 NODE_RANK=<0..7> MASTER_ADDR=<node 0 address> \
#     bash scripts/launch_multinode.sh train --stage progressive --config configs/umarvel/progressive.yaml
#
# LAUNCHER=torchrun (default) uses torch.distributed.run's static rendezvous; LAUNCHER=deepspeed
# uses the DeepSpeed launcher with a hostfile (HOSTFILE, one "host slots=8" line per node, run on
# node 0 only). DeepSpeed ZeRO itself is chosen by the config's train.deepspeed in both cases.
set -euo pipefail
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
GPUS_PER_NODE=${GPUS_PER_NODE:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}

case "${LAUNCHER:-torchrun}" in
  torchrun)
    exec torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS_PER_NODE" \
      --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" -m umarvel "$@"
    ;;
  deepspeed)
    exec deepspeed --hostfile "${HOSTFILE:-hostfile}" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
      --module umarvel "$@"
    ;;
  *)
    echo "LAUNCHER must be torchrun or deepspeed" >&2
    exit 2
    ;;
esac
