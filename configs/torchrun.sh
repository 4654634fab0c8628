#!/usr/bin/env bash
# One merge, several processes on this node, launched with torchrun. Each rank writes its own output shards
# (split by bytes); rank 0 writes the index and manifest once every rank has succeeded.
#
#   configs/torchrun.sh PLAN.yaml [shardmerge flags...]         e.g. configs/torchrun.sh plan.yaml --dry-run
#   NPROC=8 configs/torchrun.sh PLAN.yaml                        ranks on this node (default: one per GPU, else 4)
#
# With GPUs, `device: auto` puts rank r on cuda:LOCAL_RANK. Every rank has the plan's max_memory budget of its
# own, so the node needs NPROC x max_memory of RAM. Several nodes: use configs/slurm-merge.sbatch, or run this
# line on every node with `--nnodes N --node_rank I --rdzv_backend c10d --rdzv_endpoint HOST0:29500` in place
# of `--standalone`.
set -euo pipefail
PLAN=${1:?usage: configs/torchrun.sh PLAN.yaml [shardmerge flags...]}
shift
if [ -z "${NPROC:-}" ]; then
  NPROC=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [ "${NPROC:-0}" -ge 1 ] || NPROC=4
fi
# A rank that dies (killed, out of memory) fails the job within this many seconds; a slow rank is waited for.
export SHARDMERGE_DIST_TIMEOUT=${SHARDMERGE_DIST_TIMEOUT:-300}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
exec torchrun --standalone --nproc_per_node "$NPROC" -m shardmerge "$PLAN" "$@"
