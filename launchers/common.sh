#!/bin/bash
# Shared by the sbatch scripts: one srun task per node, torchrun inside it for the node's GPUs.
# MASTER_ADDR is the first node of the allocation. Extra arguments are Hydra overrides.
#
# Processes per node: ERNIE_GPUS_PER_NODE if set, else the GPUs Slurm allocated on the node
# (SLURM_GPUS_ON_NODE), else the GPUs `nvidia-smi -L` lists. 0 is CPU mode: one process per node
# (the library then uses gloo), GPUs hidden, OMP_NUM_THREADS = the node's CPUs of the job
# (SLURM_CPUS_ON_NODE), so the process neither oversubscribes nor idles the node.
set -euo pipefail

_ernie_visible_gpus() {
  local n=0
  if command -v nvidia-smi >/dev/null 2>&1; then
    n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  fi
  echo "${n:-0}"
}

ernie_launch() {
  : "${SLURM_JOB_NODELIST:?run this under sbatch/salloc}"
  local master nnodes gpus procs overrides mode
  local hosts
  # read the whole list (a `| head -n 1` would SIGPIPE scontrol, fatal under pipefail)
  mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
  master=${hosts[0]:?no hosts in SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST}
  nnodes=${SLURM_NNODES:-1}
  gpus=${ERNIE_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-$(_ernie_visible_gpus)}}
  overrides=$(printf ' %q' "$@")  # keep spaces and quotes of each override intact through srun
  export MASTER_ADDR=$master MASTER_PORT=${MASTER_PORT:-29500}
  if [ "$gpus" = 0 ]; then
    procs=1 mode="CPU mode: 1 gloo process"
    export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_ON_NODE:-1}}
  else
    procs=$gpus mode="${gpus} GPUs"
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
  fi
  export CUDA_DEVICE_MAX_CONNECTIONS=1
  # a bad override fails here, on the batch host, in seconds: one `error:` line, exit 2, no rank started
  ${PYTHON:-python} -m megatron_ernie.train --show "$@" >/dev/null
  echo "megatron-ernie: ${nnodes} nodes x ${mode}, OMP_NUM_THREADS=${OMP_NUM_THREADS}, master ${MASTER_ADDR}:${MASTER_PORT}, overrides:${overrides}"
  srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c "echo \"megatron-ernie: node \${SLURMD_NODENAME:-?} SLURM_NODEID=\${SLURM_NODEID} starts ${procs} process(es)\"; \
    exec ${PYTHON:-python} -m torch.distributed.run \
    --nnodes=${nnodes} --nproc-per-node=${procs} --node-rank=\${SLURM_NODEID} \
    --master-addr=${MASTER_ADDR} --master-port=${MASTER_PORT} \
    -m megatron_ernie.train${overrides}"
}
