#!/bin/bash
#SBATCH --job-name=ernie45-300b-upo
#SBATCH --nodes=24
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --output=logs/%x-%j.out
# Offline UPO (recipe=upo_offline: preference pairs from data.path) of ERNIE-4.5-300B-A47B on
# 24 nodes x 8 H100 (192 GPUs, BF16).
# Layout: TP 8 (inside a node) x PP 6 (9 layers per stage) x EP 16 x ETP 1, sequence parallel,
# distributed optimizer; DP 4, expert DP 2.
# Why more than SFT's 12 nodes: besides the trained policy, every GPU holds the frozen reference
# model. EP 16 halves the experts (~96 % of the parameters) per GPU against SFT's EP 8: ~3.3B
# parameters per GPU, ~20 GB of bf16 weights + fp32 grads, ~19 GB of Adam state over 192 ranks,
# ~6.5 GB for the reference: ~45 GB before activations of one pair (micro-batch: chosen +
# rejected) at seq 4096.
# World size must be a multiple of TP x PP = 48 and of PP x EP = 96.
#   sbatch launchers/upo_300b.sh model.init_from=runs/sft_300b data.path=/data/pairs.jsonl
# Every argument is passed through as a Hydra override (later ones win).
# Submit from the repository root: the job runs there and writes its log to logs/.
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
source launchers/common.sh
ernie_launch recipe=upo_offline model=ernie45_300b_a47b name=upo_300b \
  parallel.tp=8 parallel.pp=6 parallel.ep=16 parallel.etp=1 parallel.sequence_parallel=true \
  parallel.distributed_optimizer=true model.dtype=bf16 \
  data.seq_length=4096 train.global_batch_size=256 train.micro_batch_size=1 train.steps=1000 \
  optim.lr=1.0e-6 optim.min_lr=1.0e-7 optim.warmup_steps=20 checkpoint.interval=100 checkpoint.keep_last=2 \
  "$@"
