#!/bin/bash
# Shared by the sbatch scripts: one srun task per node, torchrun inside it for the node's GPUs.
# MASTER_ADDR is the first node of the allocation. Extra arguments are Hydra overrides.
set -euo pipefail

ernie_launch() {
  : "${SLURM_JOB_NODELIST:?run this under sbatch/salloc}"
  local master nnodes gpus overrides
  local hosts
  # read the whole list (a `| head -n 1` would SIGPIPE scontrol, fatal under pipefail)
  mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
  master=${hosts[0]:?no hosts in SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST}
  nnodes=${SLURM_NNODES:-1}
  gpus=${ERNIE_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
  overrides=$(printf ' %q' "$@")  # keep spaces and quotes of each override intact through srun
  export MASTER_ADDR=$master MASTER_PORT=${MASTER_PORT:-29500}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8} CUDA_DEVICE_MAX_CONNECTIONS=1
  echo "megatron-ernie: ${nnodes} nodes x ${gpus} GPUs, master ${MASTER_ADDR}:${MASTER_PORT}, overrides:${overrides}"
  srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c "exec ${PYTHON:-python} -m torch.distributed.run \
    --nnodes=${nnodes} --nproc-per-node=${gpus} --node-rank=\${SLURM_NODEID} \
    --master-addr=${MASTER_ADDR} --master-port=${MASTER_PORT} \
    -m megatron_ernie.train${overrides}"
}
